"""Building and loading the CUDA extension (``csrc/``) of the CUDA backend; the tiling lives in
:mod:`.cuda_ops`.

The extension is built with ninja on first eager use (``torch.utils.cpp_extension.load``), never
at import and never while tracing: the contract's ops (``fastpref::*``, :mod:`.registered_ops`) are
opaque ``torch.library`` ops whose fake kernels need no extension.  ``FASTPREF_BUILD_CUDA=1 pip
install .`` builds it ahead of time as ``fastpref._C`` (setup.py), which is preferred when present.
Both register the four ``fastpref_cuda::`` epilogue ops of ``csrc/fastpref_api.cpp``; their fake
kernels are registered here, right after the load.

Also here, for CI without a GPU: the ``nvcc`` command line of the device code (``csrc/epilogue.cu``
includes no torch header) and a parser of its ``ptxas -v`` report (registers, spills, shared
memory per kernel).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

EPILOGUE_OPS = ("logprobs_stats_fwd", "logprobs_grad_tile", "divergence_stats_fwd", "divergence_grad_tile")
SOURCES = ("fastpref_api.cpp", "epilogue.cu")  # epilogue.cuh and fastpref_params.h are included
DEVICE_SOURCE = "epilogue.cu"
# No --use_fast_math: it turns tanhf (softcap) into tanh.approx.f32 (~2^-11 relative error).  setup.py
# passes the same flags to the ahead-of-time build.
CUDA_FLAGS = ["-O3", "-lineinfo", "-ftz=true", "-prec-div=false", "-fmad=true"]

_lock = threading.Lock()
_ops: Any = None  # torch.ops.fastpref_cuda once loaded
_load_error: Optional[str] = None
_toolchain: Optional[list] = None  # [reason or None], computed once


def csrc_dir() -> Path:
    """The installed ``fastpref.csrc`` package directory (the sources ship as package data)."""
    spec = importlib.util.find_spec("fastpref.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fastpref.csrc is not installed (the CUDA sources ship in it)")
    return Path(list(spec.submodule_search_locations)[0])


def _aot_available() -> bool:
    try:
        return importlib.util.find_spec("fastpref._C") is not None
    except (ImportError, ValueError):
        return False


def _toolchain_reason() -> Optional[str]:
    """Why a JIT build cannot start (no ninja, no nvcc), or None; checked once, never builds."""
    global _toolchain
    if _toolchain is None:
        reason = None
        try:
            from torch.utils import cpp_extension

            if not cpp_extension.is_ninja_available():
                reason = "ninja is not installed (pip install ninja), so the CUDA extension cannot be built"
            elif cpp_extension.CUDA_HOME is None:
                reason = "no CUDA toolkit was found (set CUDA_HOME), so nvcc cannot build the CUDA extension"
            elif not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists() and shutil.which("nvcc") is None:
                reason = f"nvcc was not found under CUDA_HOME={cpp_extension.CUDA_HOME} nor on PATH"
            else:
                missing = [s for s in SOURCES if not (csrc_dir() / s).is_file()]
                if missing:
                    reason = f"the CUDA sources {missing} are missing from {csrc_dir()}"
        except Exception as exc:  # a broken toolchain probe is a reason, not a crash
            reason = f"the CUDA toolchain check failed ({type(exc).__name__}: {exc})"
        _toolchain = [reason]
    return _toolchain[0]


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the CUDA backend can run on ``device`` (it may still have to build first), else why not."""
    if device.type != "cuda":
        return f"the CUDA backend runs on CUDA tensors only (got {device.type} tensors)"
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support (torch.version.cuda is None)"
    if _ops is not None:
        return None
    if _load_error is not None:
        return f"building/loading the CUDA extension failed earlier: {_load_error}"
    if _aot_available():
        return None
    return _toolchain_reason()


def fake_epilogue(*args, **kwargs) -> None:
    """Fake (meta) kernel of every fastpref_cuda op: they only write into their (a!) arguments."""
    return None


def _register_fakes() -> None:
    # torch.library.register_fake needs the op to exist, and the schemas live in C++
    # (TORCH_LIBRARY in fastpref_api.cpp): so fakes are registered right after the load.
    for name in EPILOGUE_OPS:
        torch.library.register_fake(f"fastpref_cuda::{name}")(fake_epilogue)


def load() -> Any:
    """Build (ninja, first call only) or import the extension; returns ``torch.ops.fastpref_cuda``.

    Call it eagerly (e.g. at start-up) to keep the one-time build (~1 min) out of the first step.
    """
    global _ops, _load_error
    if _ops is not None:
        return _ops
    if torch.compiler.is_compiling():
        raise RuntimeError("fastpref: the CUDA extension must be loaded eagerly, not while tracing")
    with _lock:
        if _ops is not None:
            return _ops
        if _load_error is not None:
            raise RuntimeError(f"fastpref: the CUDA extension is unavailable: {_load_error}")
        try:
            if _aot_available():
                importlib.import_module("fastpref._C")  # registers the fastpref_cuda ops
            else:
                reason = _toolchain_reason()
                if reason is not None:
                    raise RuntimeError(reason)
                from torch.utils.cpp_extension import load as jit_load

                src = csrc_dir()
                jit_load(
                    name="fastpref_cuda",
                    sources=[str(src / s) for s in SOURCES],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=CUDA_FLAGS,
                    extra_include_paths=[str(src)],
                    is_python_module=False,
                    verbose=os.environ.get("FASTPREF_VERBOSE_BUILD") == "1",
                )
            _register_fakes()
            ops = torch.ops.fastpref_cuda
            for name in EPILOGUE_OPS:
                getattr(ops, name)  # fails loudly if the library did not register them
        except Exception as exc:
            _load_error = f"{type(exc).__name__}: {exc}"
            raise RuntimeError(f"fastpref: building/loading the CUDA extension failed: {_load_error}") from exc
        _ops = ops
    return _ops


# --------------------------------------------------------------------------- device code without a GPU


def nvcc_command(arch: str, output: Path, *, ptxas_verbose: bool = False) -> list[str]:
    """``nvcc -c`` of the device code for ``arch`` (e.g. ``"sm_90"``) with the build's flags, warnings
    as errors; ``ptxas_verbose`` adds ``-Xptxas -v`` (the per-kernel resource report, on stderr)."""
    nvcc = shutil.which("nvcc") or "nvcc"
    cmd = [nvcc, "-std=c++17", *CUDA_FLAGS, f"-gencode=arch=compute_{arch[3:]},code={arch}", "-Werror",
           "all-warnings", "-c", str(csrc_dir() / DEVICE_SOURCE), "-o", str(output)]
    if ptxas_verbose:
        cmd[1:1] = ["-Xptxas", "-v"]
    return cmd


class KernelResources(NamedTuple):
    """One kernel's ``ptxas -v`` report."""

    arch: str
    kernel: str  # demangled when c++filt is available
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame
    smem: int  # bytes of static shared memory


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


def parse_ptxas(text: str) -> list[KernelResources]:
    """The per-kernel entries of a ``ptxas -v`` report (nvcc's stderr with ``-Xptxas -v``)."""
    entries: list[dict] = []
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            entries.append(dict(kernel=m.group(1), arch=m.group(2), stack=0, spill_stores=0, spill_loads=0,
                                registers=-1, smem=0))
            continue
        if not entries:
            continue
        cur = entries[-1]
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            cur["smem"] = int(s.group(1)) if s else 0
    names = _demangle([e["kernel"] for e in entries])
    return [KernelResources(e["arch"], name, e["registers"], e["spill_stores"], e["spill_loads"], e["stack"], e["smem"])
            for e, name in zip(entries, names)]


def short_kernel_name(name: str) -> str:
    """``fastpref::epilogue::logprobs_fwd_kernel<float, 4>(...)`` -> ``logprobs_fwd_kernel<float, 4>``."""
    name = name.split("(")[0]
    for prefix in ("void ", "fastpref::epilogue::"):
        name = name.replace(prefix, "")
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")
