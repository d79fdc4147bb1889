#!/usr/bin/env bash
# GPU check for bnfast on a machine with one CUDA GPU and no internet:
# build in place, run the CUDA tests, run the kernel benchmark, summarize.
# Expects torch (with CUDA), nvcc and ninja preinstalled; finishes in < 8 min
# on an H100. Every step has a timeout; a failed step does not stop the
# others, but the script exits non-zero if any failed.
#   usage: bash benchmarks/gpu_check.sh        (from anywhere)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then PY=python; fi
VENV=${BNFAST_GPU_VENV:-$ROOT/.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV" || VENV=""
fi
[ -n "$VENV" ] && PY="$VENV/bin/python"

DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" 2>/dev/null || echo none)
SLUG=$(echo "$DEVICE" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
OUT="$ROOT/benchmarks/results/gpu-${SLUG:-unknown}"
mkdir -p "$OUT"
echo "device: $DEVICE   python: $PY   results: $OUT"

declare -a NAMES STATUSES TIMES
FAILED=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" start rc
  start=$(date +%s)
  echo "== $name (timeout ${limit}s) -> $log"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  NAMES+=("$name"); TIMES+=("$(( $(date +%s) - start ))s")
  if [ $rc -eq 0 ]; then STATUSES+=("ok"); else
    [ $rc -eq 124 ] && STATUSES+=("TIMEOUT") || STATUSES+=("FAIL($rc)")
    FAILED=1; tail -n 30 "$log"
  fi
}

step env 60 "$PY" -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda); \
print(torch.cuda.get_device_name(0)); assert torch.cuda.is_available()"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0+PTX"}
step build 300 "$PY" setup.py build_ext --inplace
step check-cuda-kernels 60 "$PY" -c "import torch, bnfast; \
from torch._C import _dispatch_has_kernel_for_dispatch_key as has; \
ops = ['stats','gather_stats','update_stats_','elemt','backward_reduce','backward_elemt','forward','backward']; \
missing = [o for o in ops if not has('bnfast::' + o, 'CUDA')]; \
assert not missing, f'no CUDA kernel for {missing}'; print('CUDA kernels registered for', ops)"
export BNFAST_TEST_DEVICES=cuda
# The device-parametrized tests, on the GPU only (the nvcc compile check and
# the CPU-only benchmark/data tests are CI's job).
step tests 240 "$PY" -m pytest tests -m "not slow and not cuda_compile" -q -p no:cacheprovider \
  --ignore=tests/test_benchmarks.py --ignore=tests/test_train_cifar.py --ignore=tests/test_cifar10.py \
  --junitxml="$OUT/tests.xml"
step benchmark 150 "$PY" -m benchmarks.kernels --device cuda --out "$OUT"
step bars 30 "$PY" -m benchmarks.cuda_bars "$OUT/kernels.json"

{
  echo "bnfast GPU check on $DEVICE ($(date -u +%Y-%m-%dT%H:%MZ))"
  printf '%-20s %-12s %s\n' step status time
  for i in "${!NAMES[@]}"; do printf '%-20s %-12s %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${TIMES[$i]}"; done
  tail -n 1 "$OUT/tests.log" 2>/dev/null | sed 's/^/tests: /'
  cat "$OUT/bars.log" 2>/dev/null
} | tee "$OUT/summary.txt"
exit $FAILED
