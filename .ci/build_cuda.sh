#!/usr/bin/env bash
# Compile and link the CUDA kernels of isofast._C (csrc/cuda/*.cu + the C++ sources) for sm_80
# and sm_90 with ISOFAST_CUDA=1, into a temporary build directory (nothing is installed or
# copied into the source tree). Needs nvcc and torch with CUDA; no GPU. Exits nonzero, with the
# compiler's message, if any source fails to compile or the library fails to link.
# Usage: .ci/build_cuda.sh [python]   (default: python on PATH; MAX_JOBS caps the parallel compiles)
set -euo pipefail
PY=${1:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/isofast-cuda-build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
cd "$ROOT"
start=$(date +%s)
ISOFAST_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py -q build_ext --build-temp "$TMP/temp" --build-lib "$TMP/lib"
so=$(find "$TMP/lib" -name '_C*.so' | head -n 1)
if [ -z "$so" ]; then
  echo "build_cuda: no isofast/_C*.so was produced" >&2
  exit 1
fi
# The CUDA kernels must be in the library, for both architectures (cuobjdump when the toolkit
# has it; otherwise the fat binary section and its per-architecture cubin tags).
archs=$(echo "${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" | tr ';' '\n' | sed 's/+PTX//; s/\.//' | sed 's/^/sm_/')
if command -v cuobjdump > /dev/null; then
  listing=$(cuobjdump --list-elf "$so")
else
  readelf -S "$so" > "$TMP/sections"
  grep -q '\.nv_fatbin' "$TMP/sections" || { echo "build_cuda: $so has no CUDA fat binary" >&2; exit 1; }
  listing=$(strings "$so" | grep -o 'sm_[0-9]*' | sort -u)
fi
for arch in $archs; do
  if ! grep -q "$arch" <<< "$listing"; then
    echo "build_cuda: $so has no $arch code" >&2
    exit 1
  fi
done
echo "build_cuda: CUDA kernels compiled and linked for ${TORCH_CUDA_ARCH_LIST:-8.0;9.0} in $(( $(date +%s) - start )) s"
