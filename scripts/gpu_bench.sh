python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
# The GPU benchmark for a lent H100, in one call (about 4-6 minutes). From the repository root:
#   device run: command "bash scripts/gpu_bench.sh", carry [".whl"], timeout_s 540
# .whl/ holds the packages the device image lacks (kornia, kornia_rs, ftfy, wcwidth); fetch them
# here first (see docs/performance.md). Writes $OUT/bench.json, $OUT/bench.log and $OUT/gpu.txt.
set -o pipefail
OUT=${OUT:-/tmp/mvfa-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/gpu.txt"
# Sizes: forward at batch 1..256 (fp16, bf16); protocol over all 3715 test images; 200 million
# AUROC scores on the GPU (sklearn, on the host CPU, on the share that fits 20 s, extrapolated n log n);
# evaluation memory at 256 and 1024 images; a 1-million-token bank search. `process` is CPU-only.
timeout 500 python3 -m mvfa.bench --device cuda \
  --only forward,train_step,protocol,auroc,memory,startup \
  --full_protocol --auroc_n 200000000 --sklearn_budget_s 20 \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
