"""Backend dispatch: ``"auto" | "torch" | "triton" | "cuda"`` (env override ``FASTPREF_BACKEND``).

Every backend implements the contract of :mod:`.contract` as plain Python functions; the four
``torch.library`` ops (``fastpref::logprobs_fwd`` ...) registered in :mod:`._register` take the
user's backend *choice* and resolve it here, inside the op: so resolution runs eagerly (or once,
in the fake kernel, while ``torch.compile`` traces) and never becomes part of a traced graph.

Resolution routes what a backend cannot serve: float64 always runs the torch backend (the kernels
accumulate in fp32; float64 is for gradcheck, not speed); ``auto`` takes the first backend that can
run the call (``triton``, ``cuda``, ``torch`` on CUDA; ``torch`` elsewhere) and says once, at INFO
level, which it chose; an explicit backend that cannot run the call raises and says why.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional, Union

import torch

log = logging.getLogger("fastpref")

BACKENDS = ("torch", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
_MODULES = {"torch": "torch_backend", "triton": "triton_ops", "cuda": "cuda_ops"}
_announced: set = set()
_resolved: dict = {}


def backend_module(name: str):
    """The module implementing backend ``name`` (imported on first use)."""
    return importlib.import_module(f".{_MODULES[name]}", __name__)


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """``None`` if backend ``name`` can run on ``device``, else a sentence saying why not."""
    try:
        mod = backend_module(name)
    except Exception as exc:  # an import failure is a reason, not a crash
        return f"{name}: import failed ({type(exc).__name__}: {exc})"
    return mod.unavailable_reason(device)


def _cannot_serve(name: str, device: torch.device, op: str, opts, sharded: bool) -> Optional[str]:
    reason = unavailable_reason(name, device)
    if reason is None and opts is not None:
        reason = backend_module(name).unsupported(op, opts, sharded)
    return reason


def resolve(choice: str, device: torch.device, dtype: torch.dtype, op: str = "", opts=None,
            sharded: bool = False) -> str:
    """The backend that runs one call of ``op`` (``"logprobs"`` / ``"divergence"``) with ``opts``;
    ``sharded``: the weight is a slice of the vocabulary."""
    env = os.environ.get("FASTPREF_BACKEND") or choice
    key = (env, device, dtype, op, opts, sharded)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(env, torch.device(device), dtype, op, opts, sharded)
        _resolved[key] = name
    return name


def _resolve(choice: str, device: torch.device, dtype: torch.dtype, op: str, opts, sharded: bool) -> str:
    if choice not in CHOICES:
        raise ValueError(f"backend: expected one of {list(CHOICES)}, got {choice!r} (FASTPREF_BACKEND?)")
    if dtype == torch.float64:
        return "torch"
    if choice != "auto":
        reason = _cannot_serve(choice, device, op, opts, sharded)
        if reason is not None:
            raise RuntimeError(f"backend: {choice!r} cannot run on {device}: {reason}")
        return choice
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
    reasons = {}
    for name in order:
        reasons[name] = _cannot_serve(name, device, op, opts, sharded)
        if reasons[name] is None:
            if (name, device.type) not in _announced:
                _announced.add((name, device.type))
                log.info("fastpref: backend='auto' chose %r for %s tensors", name, device.type)
            return name
    raise RuntimeError(f"backend: no backend can run on {device} ({'; '.join(f'{n}: {r}' for n, r in reasons.items())})")


def available_backends(device: Union[torch.device, str, None] = None) -> dict:
    """``{name: None | reason}`` for every backend on ``device`` (a ``torch.device`` or a string such as
    ``"cuda:0"``; default: the current CUDA device if there is one, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a torch.device or a string, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from None
    return {name: unavailable_reason(name, device) for name in BACKENDS}
