#!/usr/bin/env bash
# Build bnfast_harness (harness.cu) with bnfast's CUDA kernels, without torch
# and without a GPU:
#
#   bash benchmarks/cuda_harness/build.sh                  -> benchmarks/cuda_harness/bnfast_harness
#   bash benchmarks/cuda_harness/build.sh -o PATH          another output path
#   bash benchmarks/cuda_harness/build.sh --arch 80        machine code for another card (default 90)
#   bash benchmarks/cuda_harness/build.sh --objects DIR    link the kernel objects DIR/<stem>.o that
#                                                          tests/cuda_build.py compiled, instead
#                                                          of compiling csrc/cuda/*.cu again
#
# The kernels are compiled with the CI compile check's flags (its
# NVCC_FLAGS: torch's CUDAExtension defines; csrc alone on the include path),
# in parallel, for sm_90 machine code (the H100 / H200) unless --arch; NVCC
# picks the nvcc. The check's own objects (--objects) carry compute_90 PTX
# only, which is what a CPU-only link and --plan run need.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
NVCC=${NVCC:-nvcc}
OUTPUT="$HERE/bnfast_harness"
OBJECTS=""
ARCH=90
while [ $# -gt 0 ]; do
  case "$1" in
    -o) OUTPUT=$2; shift 2 ;;
    --objects) OBJECTS=$2; shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    *) echo "usage: bash build.sh [-o OUTPUT] [--objects DIR] [--arch NN]" >&2; exit 2 ;;
  esac
done

GENCODE=(-gencode "arch=compute_$ARCH,code=sm_$ARCH")
FLAGS=(-std=c++20 -O3 "-I$ROOT/csrc" "${GENCODE[@]}"
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)

KERNELS=("$ROOT"/csrc/cuda/*.cu)
if [ -z "$OBJECTS" ]; then
  OBJECTS=$WORK
  export NVCC OBJECTS
  printf '%s\n' "${KERNELS[@]}" | xargs -P "$(nproc)" -I{} \
    sh -c 'src=$1; shift; "$NVCC" -c "$src" -o "$OBJECTS/$(basename "$src" .cu).o" "$@"' _ {} "${FLAGS[@]}"
fi
LINK=()
for k in "${KERNELS[@]}"; do LINK+=("$OBJECTS/$(basename "$k" .cu).o"); done

"$NVCC" -c "$HERE/harness.cu" -o "$WORK/harness.o" "${FLAGS[@]}"
"$NVCC" -o "$OUTPUT" "$WORK/harness.o" "${LINK[@]}" "${GENCODE[@]}"
echo "built $OUTPUT in $(( $(date +%s) - START ))s"
