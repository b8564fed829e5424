"""Timing and peak-memory helpers, shared by the CLI worker and the pytest-benchmark suite.

``make_step`` builds the callable that is timed: clear the gradients, run the loss,
``backward()``, and synchronise the device inside the call (so a pytest-benchmark
``pedantic`` round, or :func:`time_calls`, measures finished work).

Peak memory is the increment over the inputs of one call:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the call.
- CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the call minus before it.  The
  CLI runs each (case, provider) in a fresh process with the inputs already allocated,
  and resets the process's peak RSS (Linux ``/proc/self/clear_refs``, "5") after the
  warm-up so that compilation, which happens in the warm-up, is not counted.  glibc is told to
  return freed blocks to the OS (``mallopt``), so the warm-up's freed memory is not
  silently reused by the measured call.  Where the reset is impossible the first
  (warm-up) call is the one measured, and the results say so.

Both include the gradients of the trainable tensors, which every provider must produce.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

MiB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(fn: Callable, args: Sequence, params: Sequence[torch.Tensor], device: torch.device) -> Callable:
    """The timed unit: fresh gradients, forward, backward, device sync; returns the detached loss."""

    def step():
        for p in params:
            p.grad = None
        loss = fn(*args)
        loss.backward()
        sync(device)
        return loss.detach()

    return step


def time_calls(step: Callable, repeats: int) -> List[float]:
    """Wall-clock seconds of ``repeats`` calls (the step synchronises the device itself)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def median_ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


_libc = None


def configure_malloc() -> bool:
    """glibc: serve blocks >= 64 KiB by mmap and trim eagerly, so freed tensors leave the RSS.

    Without this, memory freed by the warm-up call is reused silently by the measured call
    and its peak RSS does not rise.  False where this is not glibc.
    """
    global _libc
    if _libc is not None:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 16) == 1 and libc.mallopt(m_trim_threshold, 1 << 16) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        _libc = libc
    return ok


def reset_cpu_peak() -> bool:
    """Reset this process's peak RSS to the current RSS (Linux); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuPeak:
    """``with CpuPeak() as m: ...`` -> ``m.bytes``, the rise of the peak RSS inside the block."""

    def __init__(self, reset: bool = True):
        self.reset = reset
        self.was_reset = False
        self.bytes = 0

    def __enter__(self):
        gc.collect()
        configure_malloc()
        if _libc is not None:
            _libc.malloc_trim(0)
        self.was_reset = reset_cpu_peak() if self.reset else False
        self.before = _maxrss_bytes()
        return self

    def __exit__(self, *exc):
        self.bytes = max(0, _maxrss_bytes() - self.before)
        return False


def measure_call(step: Callable, device: torch.device) -> Dict:
    """Run ``step`` once; its seconds, loss, and peak memory increment (bytes) over what exists before."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        loss = step()
        sec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"seconds": sec, "loss": loss, "peak_bytes": int(peak), "mem_method": "torch.cuda.max_memory_allocated"}
    with CpuPeak() as m:
        t0 = time.perf_counter()
        loss = step()
        sec = time.perf_counter() - t0
    method = "ru_maxrss (peak reset after warm-up)" if m.was_reset else "ru_maxrss"
    return {"seconds": sec, "loss": loss, "peak_bytes": int(m.bytes), "mem_method": method}


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


def grad_norms(params: Sequence[torch.Tensor]) -> List[Optional[float]]:
    return [None if p.grad is None else float(p.grad.double().norm()) for p in params]
