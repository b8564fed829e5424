"""Resources of the CUDA backend's epilogue kernels, from ``ptxas -v``, without a GPU.

Compiles ``csrc/epilogue.cu`` (no torch headers) with the build's flags for each architecture and
writes a markdown table of registers, spill stores / loads, stack frame and static shared memory per
kernel instantiation (default ``benchmarks/results/ptxas-cuda.md``).  tests/test_cuda_backend.py
asserts the same report has no spills.

    python benchmarks/ptxas_cuda.py [--arch sm_80 sm_90] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
from pathlib import Path

from fastpref.backends import cuda_build


def compile_report(arch: str) -> tuple[list[cuda_build.KernelResources], str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = cuda_build.nvcc_command(arch, Path(tmp) / f"epilogue_{arch}.o", ptxas_verbose=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"nvcc failed for {arch}:\n{proc.stderr}")
    shown = ["nvcc"] + [f"csrc/{cuda_build.DEVICE_SOURCE}" if c.endswith(cuda_build.DEVICE_SOURCE) else
                        (Path(c).name if c.endswith(".o") else c) for c in cmd[1:]]
    return cuda_build.parse_ptxas(proc.stderr), " ".join(shown)


def nvcc_version() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.splitlines()
    return next((line.strip() for line in out if "release" in line), "nvcc version unknown")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ptxas-cuda.md")
    args = ap.parse_args(argv)
    rows, cmds = [], []
    for arch in args.arch:
        report, cmd = compile_report(arch)
        rows += report
        cmds.append(cmd)
    lines = [
        "# CUDA backend: `ptxas -v` per epilogue kernel",
        "",
        f"Compiled ahead of time on a CPU machine ({datetime.date.today().isoformat()}, {nvcc_version()}) with:",
        "",
        *[f"    {c}" for c in cmds],
        "",
        "Each kernel runs 256 threads per block (`__launch_bounds__(256)`: at most 255 registers); forward kernels",
        "are instantiated per tile dtype, backward kernels per (tile, dz) dtype pair; `<T, N>`: N-element vector",
        "loads.  Shared memory is static (the block reduction); no kernel uses dynamic shared memory.",
        "",
        "| kernel | arch | registers | spill stores (B) | spill loads (B) | stack (B) | smem (B) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (cuda_build.short_kernel_name(r.kernel), r.arch)):
        lines.append(f"| `{cuda_build.short_kernel_name(r.kernel)}` | {r.arch} | {r.registers} | {r.spill_stores} | "
                     f"{r.spill_loads} | {r.stack} | {r.smem} |")
    spills = [r for r in rows if r.spill_stores or r.spill_loads or r.stack]
    lines += ["", f"{len(rows)} kernels; {'no spills, no stack frames' if not spills else f'{len(spills)} spill'}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
