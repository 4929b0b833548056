#!/usr/bin/env bash
# The release's 4-shot Brain protocol end to end, for a lent GPU, in one call:
#   device run: command "bash scripts/gpu_protocol.sh", carry [".whl"], timeout_s 600
# Synthetic Brain at 240 px with BMAD's test size (640 normal + 3075 abnormal = 3715 images: 64 + 64
# drawn, then copied under new names, since the cost does not depend on the pixels), ViT-L-14-336
# with random weights saved as an fp16 file (as OpenAI's), then train_few.py as the release runs
# it: 50 epochs of the 88 augmented support images at batch 1, the memory bank rebuilt and the 3715
# test images evaluated after every epoch, selection on test. Target: under 10 minutes on one H100.
# Writes $OUT/protocol.log (train_few's output), $OUT/protocol.txt (the timings) and $OUT/train_few/.
#
# MVFA_SPLITS=N (N > 1): instead of train_few.py, the 4-shot Brain table of reproduce: N splits x both
# protocols (each split's protocols sharing one trajectory, the N splits in lockstep: --group_size N);
# writes $OUT/reproduce.log and $OUT/reproduce/. Target (issue #18): under 15 minutes on one H200 for 5
# splits; a part of at most ten minutes may run fewer epochs (MVFA_EPOCHS) and scale up, saying so.
#
# Any scale through the environment (tests/test_gpu_scripts.py runs it on the CPU at a tiny one):
# MVFA_MODEL, MVFA_IMG_SIZE, MVFA_STAGES, MVFA_TEST_NORMAL, MVFA_TEST_ABNORMAL, MVFA_EPOCHS, MVFA_DEVICE,
# MVFA_SPLITS. MVFA_CUDA_GRAPH=1: train with --cuda_graph (each step replayed from a CUDA graph).
# PYTHON: the interpreter to run (default python3; the test passes the one running the suite).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import kornia, ftfy" 2> /dev/null; then  # the device image lacks them: .whl/ (docs/performance.md)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-/tmp/mvfa-protocol-out}
export MVFA_MODEL=${MVFA_MODEL:-ViT-L-14-336} MVFA_IMG_SIZE=${MVFA_IMG_SIZE:-240}
export MVFA_TEST_NORMAL=${MVFA_TEST_NORMAL:-640} MVFA_TEST_ABNORMAL=${MVFA_TEST_ABNORMAL:-3075}
STAGES=${MVFA_STAGES:-6 12 18 24}
EPOCHS=${MVFA_EPOCHS:-50}
DEVICE=${MVFA_DEVICE:-cuda}
SPLITS=${MVFA_SPLITS:-1}
GRAPH=()
if [ "${MVFA_CUDA_GRAPH:-0}" = 1 ]; then GRAPH=(--cuda_graph); fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MVFA_CACHE_DIR="$WORK/cache"

"$PYTHON" - "$WORK" <<'EOF' | tee "$OUT/protocol.txt"
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from CLIP import create_model
from dataset.synthetic import generate_benchmark

work, start = Path(sys.argv[1]), time.perf_counter()
size, normal, abnormal = (int(os.environ[k]) for k in ("MVFA_IMG_SIZE", "MVFA_TEST_NORMAL", "MVFA_TEST_ABNORMAL"))
drawn = (min(normal, 64), min(abnormal, 64))
generate_benchmark(work / "data", seed=0, image_size=size, n_valid=(8, 8), n_test=drawn, datasets=["Brain"])
test = work / "data" / "Brain_AD" / "test"
for kind, wanted, folders in (("good", normal, ["img"]), ("Ungood", abnormal, ["img", "anomaly_mask"])):
    for folder in folders:
        originals = sorted((test / kind / folder).iterdir())
        for index in range(len(originals), wanted):  # copies named after the originals' pattern
            source = originals[index % len(originals)]
            shutil.copy(source, source.with_name(f"copy{index:05d}{source.suffix}"))
torch.manual_seed(0)
model = create_model(os.environ["MVFA_MODEL"])
torch.save({k: v.half() for k, v in model.state_dict().items()}, work / "clip.pt")
print(f"test images: {normal} normal + {abnormal} abnormal at {size} px ({drawn[0]} + {drawn[1]} drawn)")
print(f"data and random fp16 weights: {time.perf_counter() - start:.1f} s")
EOF

start=$(date +%s.%N)
if [ "$SPLITS" -gt 1 ]; then
  # shellcheck disable=SC2086  # STAGES is a list of block numbers
  "$PYTHON" -m mvfa.reproduce --datasets Brain --shots 4 --splits "$SPLITS" --group_size "$SPLITS" \
    --epoch "$EPOCHS" --device "$DEVICE" --data_path "$WORK/data" --model_name "$MVFA_MODEL" \
    --clip_ckpt "$WORK/clip.pt" --img_size "$MVFA_IMG_SIZE" --features_list $STAGES \
    --fewshot_seed_dir "$WORK/no-seed-lists" --output_dir "$OUT/reproduce" "${GRAPH[@]}" 2>&1 | tee "$OUT/reproduce.log"
  what="reproduce, $SPLITS splits x 2 protocols in lockstep, $EPOCHS epochs"
else
  # shellcheck disable=SC2086  # STAGES is a list of block numbers
  "$PYTHON" train_few.py --obj Brain --shot 4 --iterate -1 --epoch "$EPOCHS" --device "$DEVICE" \
    --data_path "$WORK/data" --model_name "$MVFA_MODEL" --clip_ckpt "$WORK/clip.pt" --img_size "$MVFA_IMG_SIZE" \
    --features_list $STAGES --save_path "$WORK/ckpt" --output_dir "$OUT/train_few" "${GRAPH[@]}" 2>&1 | tee "$OUT/protocol.log"
  what="protocol"
fi
end=$(date +%s.%N)
"$PYTHON" -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'{sys.argv[3]} wall s: {s:.1f} ({s / 60:.2f} min)')" \
  "$start" "$end" "$what" | tee -a "$OUT/protocol.txt"
