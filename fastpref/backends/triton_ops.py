"""Triton backend: registers the fused kernels of ``fastpref.kernels`` as ``fastpref::*_triton`` ops.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is imported; numerics only, slow).  float64 inputs are routed to the chunked
torch backend (same contract, fp64 outputs): the kernels accumulate in fp32.

Registered through ``register_backend_ops`` (``torch.library.custom_op`` + fake impls), not
``torch.library.triton_op``: the launchers mix Triton kernels with library GEMMs and a Python
chunk loop, and take optional tensors; as a custom op they are opaque to ``torch.compile``,
which is all ``fullgraph=True`` needs.
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from typing import Optional

import torch

from ._register import register_backend_ops

try:
    import triton  # noqa: F401

    from ..kernels import linear_divergence as _div
    from ..kernels import linear_logprobs as _lp
except Exception as exc:  # no triton, or a triton that cannot build the kernels
    _IMPORT_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None


def unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` when the kernels can run on ``device``, else a sentence saying why not."""
    if _IMPORT_ERROR is not None:
        return f"triton could not be imported ({_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton kernels need a CUDA device; on CPU they run only under TRITON_INTERPRET=1 (the interpreter)"
    return f"Triton kernels need a CUDA device, got {device.type!r}"


def _fp64(*tensors: Optional[torch.Tensor]) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _torch():
    from . import torch_backend

    return torch_backend


def _on_device(t):
    """Triton launches on the *current* CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def logprobs_fwd(hidden, weight, labels, bias, ignore_index, temperature, softcap, with_entropy):
    impl = _torch() if _fp64(hidden, weight, bias) else _lp
    with _on_device(hidden):
        return impl.logprobs_fwd(hidden, weight, labels, bias, ignore_index, temperature, softcap, with_entropy)


def logprobs_bwd(grad_logp, grad_entropy, hidden, weight, labels, bias, lse, entropy, ignore_index,
                 temperature, softcap, need_hidden, need_weight, need_bias):
    impl = _torch() if _fp64(hidden, weight, bias) else _lp
    with _on_device(hidden):
        return impl.logprobs_bwd(grad_logp, grad_entropy, hidden, weight, labels, bias, lse, entropy, ignore_index,
                                 temperature, softcap, need_hidden, need_weight, need_bias)


def divergence_fwd(s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, ignore_index, kind, beta,
                   temperature, s_softcap, t_softcap):
    fp64 = _fp64(s_hidden, s_weight, t_hidden, t_weight, s_bias, t_bias)
    impl = _torch() if fp64 else _div
    with _on_device(s_hidden):
        return impl.divergence_fwd(s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, ignore_index,
                                   kind, beta, temperature, s_softcap, t_softcap)


def divergence_bwd(grad, s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, stats, ignore_index,
                   kind, beta, temperature, s_softcap, t_softcap, need_hidden, need_weight, need_bias):
    fp64 = _fp64(s_hidden, s_weight, t_hidden, t_weight, s_bias, t_bias)
    impl = _torch() if fp64 else _div
    with _on_device(s_hidden):
        return impl.divergence_bwd(grad, s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, stats,
                                   ignore_index, kind, beta, temperature, s_softcap, t_softcap, need_hidden,
                                   need_weight, need_bias)


register_backend_ops(
    "triton",
    SimpleNamespace(
        logprobs_fwd=logprobs_fwd,
        logprobs_bwd=logprobs_bwd,
        divergence_fwd=divergence_fwd,
        divergence_bwd=divergence_bwd,
    ),
)
