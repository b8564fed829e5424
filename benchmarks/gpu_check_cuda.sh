#!/usr/bin/env bash
# GPU check of the CUDA C++ backend (csrc/), run from anywhere on a machine with a CUDA GPU,
# nvcc, ninja and compute-sanitizer (benchmarks/gpu_check.sh calls it after installing):
#   1. build the extension once (outside the sanitizer, so the JIT build is not instrumented),
#   2. the small case (benchmarks/cuda_small_case.py) plain, then under memcheck and racecheck.
# Exit status: non-zero if any step failed; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
step() { echo; echo "=== cuda backend: $* ==="; }

step "build + small case"
python benchmarks/cuda_small_case.py || status=1

if command -v compute-sanitizer >/dev/null 2>&1; then
    # No caching allocator, so an access just past a tensor but inside a cached block is caught.
    step "compute-sanitizer --tool memcheck (every kernel: ours, cuBLAS, torch)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 97 \
        python benchmarks/cuda_small_case.py || status=1
    step "compute-sanitizer --tool racecheck (the fastpref epilogue kernels)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --racecheck-report all \
        --error-exitcode 97 --kernel-name kns=fastpref python benchmarks/cuda_small_case.py || status=1
else
    echo "compute-sanitizer not found; skipped"; status=1
fi

echo; echo "gpu_check_cuda: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
