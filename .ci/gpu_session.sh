#!/usr/bin/env bash
# One call on a lent CUDA machine (the `device` tool): build isofast._C with its CUDA kernels
# against that machine's torch, then run the self-check, the GPU-relevant tests and the benchmark.
# Everything is logged under $OUT (the device tool's output folder; ./gpu-out elsewhere), and a
# short summary is printed last. Each stage is time-capped so one hang cannot eat the lease.
#
# Usage (repository root):  bash .ci/gpu_session.sh [--quick]
#   --quick   the benchmark's reduced sizes (about a minute) instead of the full table
# Not yet run on a GPU: no GPU was lent to the sessions that wrote it. Commit what it writes to
# $OUT/results/ under benchmarks/results/.
set -uo pipefail
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
mkdir -p "$OUT/results"
summary=()
stage() {  # stage NAME SECONDS CMD...: run, log to $OUT/NAME.log, remember the exit status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name: exit $rc in $((SECONDS - start)) s")
  return $rc
}

nvidia-smi -L | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"

# The CUDA build is chosen automatically here (torch with CUDA, nvcc, a GPU): setup.py logs why.
if ! stage build 600 env MAX_JOBS="${MAX_JOBS:-16}" $PY setup.py build_ext --inplace; then
  tail -n 40 "$OUT/build.log"
  printf '%s\n' "${summary[@]}"
  exit 1
fi
grep "isofast setup" "$OUT/build.log"

stage selfcheck 600 $PY -m isofast.selfcheck
# The tests that exercise kernels on the GPU (Triton for real, CUDA kernels, CUDA graphs); the
# rest of the suite is device-independent and runs in CI.
stage tests 900 $PY -m pytest -q -p no:cacheprovider tests/ops \
  tests/test_noise.py tests/test_sampling.py tests/test_api.py
stage throughput 1200 $PY benchmarks/throughput.py $QUICK --out-dir "$OUT/results"

echo "== selfcheck (last lines)"; tail -n 25 "$OUT/selfcheck.log"
echo "== tests (last lines)"; tail -n 8 "$OUT/tests.log"
echo "== throughput (targets)"; grep -E "^==|pass|MISS|FAILED" "$OUT/throughput.log" | tail -n 40
echo "== stages"; printf '%s\n' "${summary[@]}"
