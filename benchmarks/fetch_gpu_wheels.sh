#!/usr/bin/env bash
# Download / build, HERE (a machine with PyPI access), the wheels that benchmarks/gpu_check.sh installs on
# the GPU machine, which has no network.  Run from anywhere, inside a venv with torch, setuptools, wheel and
# packaging (the project's venv): fastpref and flash-attn are built with --no-build-isolation.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # -> .whl/ in the repository root (git-ignored)
#   bash benchmarks/fetch_gpu_wheels.sh some/dir   # elsewhere
#
# The GPU machine (device tool, nvidia-h200) runs Python 3.12 with torch 2.11, triton 3.6, transformers
# 5.17, accelerate, peft, pandas, pyarrow, xxhash, ... preinstalled: only what it lacks is fetched, all of
# it pure Python, and gpu_check.sh installs it with `pip install --no-deps --target` so the machine's torch
# and triton stay as they are.  The folder travels with the device call (`carry: [".whl"]`); together with
# the repository it must stay under the 64 MiB the device tool carries, which this script checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=${1:-.whl}
PY=${PYTHON:-python}
LIMIT_MIB=64

# The comparison packages, exact versions.  datasets (+ dill, multiprocess) is a dependency of trl that the
# GPU machine lacks; the check does not import it (trl.kernels.chunked_logprob does not need it), it is
# carried so that `import trl` and its submodules behave as after a normal install.
PURE=(
    liger-kernel==0.8.5
    cut-cross-entropy==25.1.1
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)
FLASH_ATTN=flash-attn==2.8.3.post2

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
# One version of each package: two stop the whole install on the GPU machine.  Only this script's packages
# are replaced; other wheels in the folder stay (and travel too).
for prefix in liger_kernel cut_cross_entropy trl datasets dill multiprocess flash_attn fastpref; do
    rm -f "$DEST/$prefix"-[0-9]*.whl
done

echo "== pure-Python wheels for CPython 3.12 (no dependencies resolved: each is named)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST" "${PURE[@]}"

echo "== $FLASH_ATTN as a pure-Python wheel (no CUDA build: its Triton ops only)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE \
    "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary=:all: -d "$WORK/sdist" "$FLASH_ATTN"
# FORCE_BUILD: without it setup.py tries to download a prebuilt CUDA wheel; SKIP_CUDA_BUILD: no nvcc step.
FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE \
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/fa" "$WORK"/sdist/flash_attn-*.tar.gz
cp "$WORK"/fa/flash_attn-*.whl "$DEST"/

echo "== fastpref (this checkout) as a wheel"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/fp" "$ROOT" >"$WORK/fp.log" 2>&1 \
    || { cat "$WORK/fp.log"; exit 1; }
cp "$WORK"/fp/fastpref-*.whl "$DEST"/
rm -rf "$ROOT/build"  # setuptools' scratch folder (git-ignored, but it would travel if carried)

echo "== wheels in $DEST"
bad=0
for w in "$DEST"/*.whl; do
    name=$(basename "$w")
    case "$name" in
        *-none-any.whl | *-py312-none-any.whl) ;;
        *) echo "not pure Python (will not install on the GPU machine's CPython 3.12): $name"; bad=1 ;;
    esac
    printf '%8s  %s\n' "$(du -k "$w" | cut -f1)K" "$name"
done
n_dist=$(ls "$DEST"/*.whl | sed 's#.*/##; s/-[0-9].*//' | sort | uniq -d)
if [ -n "$n_dist" ]; then echo "more than one version of: $n_dist"; bad=1; fi

# What the device call sends: tracked + untracked-not-ignored files of the checkout, plus the carried folder.
tree_bytes=$(git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && xargs -0 -r stat -c %s -- 2>/dev/null) | awk '{s += $1} END {print s + 0}')
wheel_bytes=$(du -sb "$DEST" | cut -f1)
total=$((tree_bytes + wheel_bytes))
printf 'working tree %.1f MiB + wheels %.1f MiB = %.1f MiB (device carry limit %d MiB)\n' \
    "$(echo "$tree_bytes / 1048576" | bc -l)" "$(echo "$wheel_bytes / 1048576" | bc -l)" \
    "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then echo "over the device tool's limit"; bad=1; fi
case "$DEST" in
    "$ROOT"/*) git -C "$ROOT" check-ignore -q "$DEST" || { echo "$DEST is not git-ignored: it would travel twice"; bad=1; } ;;
esac
exit $bad
