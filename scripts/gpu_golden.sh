# The release-parity check on a lent GPU, in one call (a few minutes). From the repository root:
#   cp -r ../shared/golden .gl/      (the fixture does not travel otherwise)
#   device run: command "bash scripts/gpu_golden.sh", carry [".gl", ".whl"], timeout_s 400
# .whl/ holds the packages the device image lacks (see docs/performance.md). Writes $OUT/golden.json and $OUT/golden.log.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
set -o pipefail
OUT=${OUT:-/tmp/mvfa-golden-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 | tee "$OUT/golden.log"
timeout 380 python3 scripts/gpu_golden.py --device "${MVFA_DEVICE:-cuda}" --golden "${MVFA_GOLDEN:-.gl/golden/tiny}" \
  --json "$OUT/golden.json" 2>&1 | tee -a "$OUT/golden.log"
