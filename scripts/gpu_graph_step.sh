#!/usr/bin/env bash
# The training step replayed from CUDA graphs (mvfa.runs.graph_step.CapturedStep) on a lent GPU, in one call
# (a few minutes):
#   device run: command "bash scripts/gpu_graph_step.sh", carry [".whl"], timeout_s 480
# First tests/test_graph_step.py, whose CUDA tests check that captured steps equal eager ones (an idle
# run, a second masks pattern, a solo run, autocast, the cap on graphs); then steps/s of the eager step
# (training.group_train_step) and of the captured one at batch 1 from cached prefixes, with masks, for 1
# and 6 runs: the tiny backbone, then ViT-L-14-336 at 240 px with random weights (stages 6 12 18 24).
# Writes $OUT/gpu.txt, $OUT/tests.log and $OUT/timing.txt; exits non-zero when a part failed (the
# timing runs even when a test failed).
# PYTHON: the interpreter (default python3). MVFA_DEVICE (default cuda; cpu: the CUDA tests skip and
# only the eager step is timed, a check that the script runs). MVFA_STEPS: timed steps of each kind.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import kornia, ftfy" 2> /dev/null; then  # the device image lacks them: .whl/ (docs/performance.md)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-/tmp/mvfa-graph-step-out}
DEVICE=${MVFA_DEVICE:-cuda}
STEPS=${MVFA_STEPS:-30}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
} 2>&1 | tee "$OUT/gpu.txt"
failed=0
timeout 200 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_graph_step.py 2>&1 | tee "$OUT/tests.log" || failed=1
: > "$OUT/timing.txt"
timeout 90 "$PYTHON" -m mvfa.bench.graph_step --device "$DEVICE" --steps "$STEPS" \
  --model ViT-Tiny-14 --size 56 --stages 2 4 6 8 --runs 1 6 2>&1 | tee -a "$OUT/timing.txt" || failed=1
timeout 150 "$PYTHON" -m mvfa.bench.graph_step --device "$DEVICE" --steps "$STEPS" \
  --model ViT-L-14-336 --size 240 --stages 6 12 18 24 --runs 1 6 2>&1 | tee -a "$OUT/timing.txt" || failed=1
exit $failed
