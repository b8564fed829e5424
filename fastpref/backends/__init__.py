"""Backend dispatch: ``"auto" | "torch" | "triton" | "cuda"`` (env override ``FASTPREF_BACKEND``).

The contract every backend implements (2-D contiguous inputs, per-row fp32 outputs;
fp64 for fp64 inputs; an output that was not asked for is an empty tensor):

``logprobs_fwd(hidden[N,D], weight[V,D], labels[N] i64, bias[V]?, ignore_index, temperature,
softcap?, with_entropy) -> (logp[N], entropy[N] | [0], lse[N])``

``logprobs_bwd(grad_logp[N], grad_entropy[N]?, hidden, weight, labels, bias?, lse, entropy?,
ignore_index, temperature, softcap?, need_hidden, need_weight, need_bias) -> (d_hidden | [0],
d_weight | [0], d_bias | [0])``

``divergence_fwd(s_hidden[N,Ds], s_weight[V,Ds], t_hidden[N,Dt], t_weight[V,Dt], labels[N]?,
s_bias?, t_bias?, ignore_index, kind, beta, temperature, s_softcap?, t_softcap?) ->
(div[N], stats[N,3])``

``divergence_bwd(grad[N], <the same tensors>, stats, <the same scalars>, need_hidden,
need_weight, need_bias) -> (d_s_hidden | [0], d_s_weight | [0], d_s_bias | [0])``

Ignored rows give 0 and no gradient; a label outside ``[0, V)`` gives NaN (never an
out-of-bounds read).  Each backend registers these as ``torch.library`` ops named
``fastpref::<op>_<backend>`` so they are opaque to ``torch.compile``.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import SimpleNamespace
from typing import Optional

import torch

log = logging.getLogger("fastpref")

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS
_MODULES = {"torch": "torch_ops", "triton": "triton_ops", "cuda": "cuda_ops"}
_announced: set = set()
_OPS: dict = {}


def _module(name: str):
    return importlib.import_module(f".{_MODULES[name]}", __name__)


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """``None`` if backend ``name`` can run on ``device``, else a sentence saying why not."""
    try:
        mod = _module(name)
    except Exception as exc:  # an import failure is a reason, not a crash
        return f"{name}: import failed ({type(exc).__name__}: {exc})"
    return mod.unavailable_reason(device)


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a call; raises ``ValueError``/``RuntimeError`` with reasons.

    Under ``torch.compile`` this runs once at trace time and its answer is a constant.
    It also loads the chosen backend's ops, so :func:`get_ops` is a plain lookup.
    """
    name = _resolve(backend, device)
    _load(name)
    return name


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo (and with it
# Inductor and Triton) when fastpref is imported: under torch.compile, resolve() runs at trace time.
resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _load(name: str) -> SimpleNamespace:
    if name not in _OPS:
        _module(name)  # importing the module registers its ops
        _OPS[name] = SimpleNamespace(
            **{op: getattr(torch.ops.fastpref, f"{op}_{name}")
               for op in ("logprobs_fwd", "logprobs_bwd", "divergence_fwd", "divergence_bwd")}
        )
    return _OPS[name]


def _resolve(backend: str, device: torch.device) -> str:
    choice = os.environ.get("FASTPREF_BACKEND") or backend
    if choice not in _CHOICES:
        raise ValueError(f"backend: expected one of {list(_CHOICES)}, got {choice!r}")
    if choice != "auto":
        reason = unavailable_reason(choice, device)
        if reason is not None:
            raise RuntimeError(f"backend: {choice!r} cannot run on {device}: {reason}")
        return choice
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
    for name in order:
        if unavailable_reason(name, device) is None:
            key = (name, device.type)
            if key not in _announced and not torch.compiler.is_compiling():
                _announced.add(key)
                log.info("fastpref: backend='auto' chose %r for %s tensors", name, device.type)
            return name
    reasons = "; ".join(f"{n}: {unavailable_reason(n, device)}" for n in order)
    raise RuntimeError(f"backend: no backend can run on {device} ({reasons})")


def available_backends(device: torch.device) -> dict:
    """``{name: None | reason}`` for every backend on ``device``."""
    return {name: unavailable_reason(name, device) for name in BACKENDS}


def get_ops(name: str) -> SimpleNamespace:
    """The four registered ops of backend ``name`` (loaded by :func:`resolve`)."""
    return _OPS[name] if name in _OPS else _load(name)
