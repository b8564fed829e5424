#!/usr/bin/env bash
# The one-call GPU check, run from the repository root on a CUDA machine with torch + triton preinstalled and
# no network (the device tool's GPU machine), after `bash benchmarks/fetch_gpu_wheels.sh` filled .whl/ here and
# the call carries it (BENCHMARKS.md, "How to run the GPU check"):
#   install      the carried wheels (fastpref, liger-kernel, cut-cross-entropy, trl, flash-attn, ...) with
#                --no-deps into a --target folder put on PYTHONPATH: the machine's torch/triton stay as they are
#                (no fastpref wheel there: an editable install of this checkout instead);
#   cuda-build   the CUDA backend's extension (ninja, cached for every later step);
#   compare      benchmarks/gpu_check.py: every provider at the three default shapes, time / peak memory /
#                error against the fp64 oracle -> gpu_check.md + gpu_check.json (extra arguments go to it);
#   pytest       pytest -m gpu (correctness at real sizes, torch.compile, opcheck, determinism);
#   sanitizer    compute-sanitizer memcheck of a SMALL run of every Triton kernel path (gpu_check.py --small);
#   cuda         benchmarks/gpu_check_cuda.sh: the CUDA backend's small case, plain, memcheck, racecheck.
# Every step runs regardless of the others, under its own time limit, all of them inside GPU_CHECK_DEADLINE_S
# (default 480 s, so a 600 s device call always ends with the summary); a step that would start with less than
# 20 s left is skipped and counted as failed.  GPU_CHECK_STEPS picks steps (default: all, in this order).
# Output: $OUT (set by the device tool; else bench-results/) gets gpu_check.log (this whole log),
# gpu_check.md (the table for BENCHMARKS.md) and gpu_check.json.  Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
DEADLINE=${GPU_CHECK_DEADLINE_S:-480}
STEPS=${GPU_CHECK_STEPS:-install,cuda-build,compare,pytest,sanitizer,cuda}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
OUTDIR=${OUT:-bench-results}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
TEE_PID=$!

unset TRITON_INTERPRET            # the interpreter would take over every kernel in these processes
export PYTHONSAFEPATH=1           # never import ./fastpref (the source tree) instead of the installed package
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}   # ninja jobs for the CUDA extension
# gpu_check_cuda.sh and the tests call `python`; the machine's interpreter may be named python3 only.
if ! command -v python >/dev/null 2>&1; then
    mkdir -p /tmp/gpu_check_bin && ln -sf "$(command -v "$PY")" /tmp/gpu_check_bin/python
    export PATH="/tmp/gpu_check_bin:$PATH"
fi

status=0
summary=()
want() { [[ ",$STEPS," == *",$1,"* ]]; }
# limit_for S: S, or the seconds left before the deadline if fewer.
limit_for() { local left=$((DEADLINE - (SECONDS - START))); echo $(($1 < left ? $1 : left)); }
# run_step NAME LIMIT_S COMMAND...: run a command under `timeout LIMIT_S` (a shell function: directly), record
# the outcome; skipped when less than 20 s are left.
run_step() {
    local name=$1 limit rc t0 what="ok"
    limit=$(limit_for "$2")
    shift 2
    if [ "$limit" -lt 20 ]; then
        echo; echo "=== $name: SKIPPED, ${limit}s left of GPU_CHECK_DEADLINE_S=$DEADLINE ==="
        summary+=("$name: skipped (deadline)"); status=1; return
    fi
    echo; echo "=== $name (limit ${limit}s, $((SECONDS - START))s elapsed) ==="
    t0=$SECONDS
    if declare -F "$1" >/dev/null; then "$@"; else timeout --kill-after=10 "$limit" "$@"; fi
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="FAILED (time limit ${limit}s)"; elif [ $rc -ne 0 ]; then what="FAILED (exit $rc)"; fi
    echo "=== $name: $what in $((SECONDS - t0))s ==="
    summary+=("$name: $what in $((SECONDS - t0))s")
    [ $rc -eq 0 ] || status=1
}

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
install() {
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        ls -1 "$WHEELS"/*.whl
        # shellcheck disable=SC2086  # GPU_CHECK_PIP_ARGS: extra words, e.g. --python-version 3.12 for a dry run
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" ${GPU_CHECK_PIP_ARGS:-} "$WHEELS"/*.whl || return 1
    else
        echo "no wheels in $WHEELS/ (run benchmarks/fetch_gpu_wheels.sh here and carry .whl): the peers will be skipped"
    fi
    if ! compgen -G "$WHEELS/fastpref-*.whl" >/dev/null; then
        echo "no fastpref wheel: editable install of this checkout"
        timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    fi
    timeout 60 "$PY" - <<'PY'
import importlib.metadata as md, sys, torch, triton, fastpref
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("fastpref", fastpref.__version__, "from", fastpref.__file__)
for name in ("liger-kernel", "cut-cross-entropy", "trl", "flash-attn", "transformers", "datasets"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
print("backends", fastpref.available_backends(torch.device("cuda") if torch.cuda.is_available() else None))
PY
}
want install && run_step install 150 install

want cuda-build && run_step cuda-build 180 "$PY" -c '
import time
from fastpref.backends import cuda_ops
t = time.perf_counter(); cuda_ops.load(); print(f"CUDA extension ready in {time.perf_counter() - t:.0f} s")'

# The table comes first among the measurements: it is what this call is for.  Its own budget ends it 20 s
# before the step's limit, so it always writes its files; "$@" goes to gpu_check.py.
if want compare; then
    lim=$(limit_for 270)
    run_step compare "$lim" "$PY" benchmarks/gpu_check.py --out "$OUTDIR" --budget-s $((lim > 40 ? lim - 20 : 20)) "$@"
fi

# test_triton_backend.py turns on the Triton interpreter for its whole process: keep it out.
want pytest && run_step pytest 170 "$PY" -m pytest -m gpu tests/ --ignore=tests/test_triton_backend.py -q -rs \
    -p no:cacheprovider

if want sanitizer; then
    if command -v compute-sanitizer >/dev/null 2>&1; then
        # no caching allocator, so an out-of-bounds access inside a cached block is caught too
        run_step sanitizer 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
            --error-exitcode 97 "$PY" benchmarks/gpu_check.py --small
    else
        echo "compute-sanitizer not found"; summary+=("sanitizer: not found"); status=1
    fi
fi

want cuda && run_step cuda 150 bash benchmarks/gpu_check_cuda.sh

echo
echo "=== summary ($((SECONDS - START))s) ==="
printf '  %s\n' "${summary[@]}"
[ -f "$OUTDIR/gpu_check.md" ] && echo "table: $OUTDIR/gpu_check.md (+ gpu_check.json, gpu_check.log)"
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exec 1>&- 2>&-    # let tee see the end of the log and finish writing it before this script returns
wait "$TEE_PID" 2>/dev/null
exit $status
