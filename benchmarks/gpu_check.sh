#!/usr/bin/env bash
# One-shot GPU check of the Triton and CUDA backends, run from the repository root on a machine with a
# CUDA GPU and torch + triton preinstalled (no network):
#   1. editable install without touching the preinstalled torch/triton,
#   2. the GPU tests (correctness at Llama-3 size, torch.compile fullgraph, opcheck, determinism),
#   3. compute-sanitizer memcheck of a small run of every kernel path,
#   4. the timing / peak-memory table (extra arguments go to gpu_check.py, e.g. --backends triton,cuda).
# Exit status: non-zero if any step failed; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET   # the interpreter would take over every kernel in these processes
status=0
step() { echo; echo "=== $* ==="; }

step "install"
python -m pip install --no-deps --no-build-isolation -q -e . || { echo "install failed"; exit 1; }
python - <<'PY'
import torch, triton, fastpref
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("backends", fastpref.available_backends(torch.device("cuda")))
PY

step "pytest -m gpu"
# test_triton_backend.py turns on the Triton interpreter for its whole process: keep it out.
python -m pytest -m gpu tests/ --ignore=tests/test_triton_backend.py -q -rs -s -p no:cacheprovider || status=1

step "compute-sanitizer memcheck (small)"
if command -v compute-sanitizer >/dev/null 2>&1; then
    # no caching allocator, so an out-of-bounds access inside a cached block is caught too
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 97 \
        python benchmarks/gpu_check.py --small || status=1
else
    echo "compute-sanitizer not found; skipped"; status=1
fi

step "CUDA backend: build, small case, compute-sanitizer memcheck + racecheck"
bash benchmarks/gpu_check_cuda.sh || status=1

step "timing"
python benchmarks/gpu_check.py --backends triton,cuda "$@" || status=1

echo; echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
