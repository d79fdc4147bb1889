#!/usr/bin/env bash
# The GPU check: build bnfast for the card in front of it, run the GPU smoke
# tier of the tests, benchmark the kernels (and SyncBatchNorm per layer)
# against torch and judge the CUDA bars; a summary table last. Meant to finish in under 6 minutes on one
# H200 (build ~70 s, smoke tier < 2 min, benchmark < 90 s).
#
#   bash benchmarks/gpu_check.sh            the check
#   bash benchmarks/gpu_check.sh --full     + the whole CUDA-parametrized suite
#   bash benchmarks/gpu_check.sh --train    + the training-step timings, the peak memory of a
#                                           ResNet-50 leaky_relu step with and without
#                                           memory_efficient (its bar: at least 25% less), and
#                                           the DDP seed-CNN step against torch's SyncBatchNorm
#   bash benchmarks/gpu_check.sh --harness  + the standalone kernel harness built for this card
#                                           (benchmarks/cuda_harness): --check, then the kernel
#                                           timings without torch (~1 minute more)
#
# Uses the python that already has CUDA torch (PYTHON, else python3, else
# python) and never makes a virtual environment: on images whose python is
# itself a venv, a venv made from it hides torch. Every step has a timeout;
# a failed step does not stop the others, and the script exits non-zero if
# any failed. Everything lands in benchmarks/results/gpu-<device>/.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

FULL=0
TRAIN=0
HARNESS=0
for arg in "$@"; do
  case "$arg" in
    --full) FULL=1 ;;
    --train) TRAIN=1 ;;
    --harness) HARNESS=1 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--full] [--train] [--harness]" >&2; exit 2 ;;
  esac
done

PY=""
for candidate in ${PYTHON:-} python3 python; do
  if command -v "$candidate" >/dev/null && "$candidate" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=$candidate
    break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no python with CUDA torch found (tried ${PYTHON:-} python3 python)" >&2
  exit 1
fi

read -r DEVICE ARCH < <("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(p.name.replace(' ', '_'), f'{p.major}.{p.minor}')")
SLUG=$(echo "$DEVICE" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
OUT="$ROOT/benchmarks/results/gpu-${SLUG:-unknown}"
mkdir -p "$OUT"
echo "device: $DEVICE (sm_${ARCH/./})   python: $(command -v "$PY")   results: $OUT"

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

step env 60 "$PY" -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda); \
print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

# All cores, only this card's architecture, no extra CPU instruction sets.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export BNFAST_CPU_ISA=${BNFAST_CPU_ISA:-DEFAULT}
step build 240 "$PY" setup.py build_ext --inplace

export BNFAST_TEST_DEVICES=cuda
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))" --dist loadgroup); fi
step tests-smoke 150 "$PY" -m pytest tests -m gpu_smoke -q -p no:cacheprovider "${XDIST[@]}" \
  --junitxml="$OUT/tests-smoke.xml"
if [ $FULL -eq 1 ]; then
  step tests-full 600 "$PY" -m pytest tests -m "not cuda_compile and not data" -q -p no:cacheprovider \
    "${XDIST[@]}" --junitxml="$OUT/tests-full.xml"
fi
step benchmark 120 "$PY" -m benchmarks.kernels --device cuda --out "$OUT" --no-plot --quiet
step fused 90 "$PY" -m benchmarks.kernels --device cuda --fusions relu add_relu --phases fwd_bwd \
  --out "$OUT/fused" --no-plot --quiet
step bars 30 "$PY" -m benchmarks.cuda_bars "$OUT/kernels.json" "$OUT/fused/kernels.json"
# Issue #12's GPU bar: SyncBatchNorm per layer against torch's, 2 ranks (sharing the card over gloo when it is alone).
step sync 120 "$PY" -m benchmarks.sync_layers --device cuda --iters 20 --warmup 3 --out "$OUT/sync"
if [ $TRAIN -eq 1 ]; then
  step train 240 "$PY" -m benchmarks.train_cifar --device cuda --timing-only --out "$OUT/train"
  step memory 150 "$PY" -m benchmarks.memory --device cuda --model resnet50 --act leaky_relu --batch-size 64 \
    --bar 0.25 --out "$OUT/memory.json"
  step ddp 150 "$PY" -m benchmarks.ddp --device cuda --steps 100 --out "$OUT/ddp"
fi
if [ $HARNESS -eq 1 ]; then
  # Built here for this card from the tree being checked, never a carried binary of another tree.
  step harness-build 240 bash benchmarks/cuda_harness/build.sh --arch "${ARCH/./}" -o "$OUT/bnfast_harness"
  step harness-check 60 "$OUT/bnfast_harness" --check --json "$OUT/harness-check.json"
  step harness-time 120 "$OUT/bnfast_harness" --json "$OUT/harness-time.json"
fi

{
  echo "bnfast GPU check on $DEVICE ($(date -u +%Y-%m-%dT%H:%MZ))"
  printf '%-14s %-10s %s\n' step status time
  for i in "${!NAMES[@]}"; do printf '%-14s %-10s %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${TIMES[$i]}"; done
  for t in tests-smoke tests-full; do
    [ -f "$OUT/$t.log" ] && tail -n 1 "$OUT/$t.log" | sed "s/^/$t: /"
  done
  cat "$OUT/bars.log" 2>/dev/null
  grep -h "^Bar" "$OUT/sync/sync_layers.md" 2>/dev/null
  tail -n 1 "$OUT/memory.log" 2>/dev/null
} | tee "$OUT/summary.txt"
exit $FAILED
