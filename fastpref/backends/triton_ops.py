"""Triton backend: the fused kernels of ``fastpref.kernels`` behind the contract of :mod:`.contract`.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported; numerics only, slow).  Dispatch sends float64 elsewhere (the kernels
accumulate in fp32); every other option of the contract runs here.  When the whole fp32 logits of a
call fit the cache share of the workspace budget, the forward keeps them for the backward
(``*_cache_shape`` says what it returns).
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from typing import Optional

import torch

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


def unsupported(op: str, opts, sharded: bool) -> Optional[str]:
    """What these kernels cannot compute: nothing — every option of the contract, vocabulary slices
    included (float64 never gets here: dispatch sends it to the torch backend)."""
    return None


def _on_device(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def logprobs_fwd(hidden, weight, labels, bias, opts):
    with _on_device(hidden):
        return _lp.logprobs_fwd(hidden, weight, labels, bias, opts)


def logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, opts, need_hidden,
                 need_weight, need_bias):
    with _on_device(hidden):
        return _lp.logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, opts,
                                need_hidden, need_weight, need_bias)


def logprobs_cache_shape(n, vocab, dtype, opts) -> tuple[int, ...]:
    return _lp.logprobs_cache_shape(n, vocab, dtype, opts)


def divergence_cache_shape(n, vocab, dtype, opts) -> tuple[int, ...]:
    return _div.divergence_cache_shape(n, vocab, dtype, opts)


def divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, opts):
    with _on_device(s_hidden):
        return _div.divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, opts)


def divergence_bwd(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache, opts, need_hidden,
                   need_weight, need_bias):
    with _on_device(s_hidden):
        return _div.divergence_bwd(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache, opts,
                                   need_hidden, need_weight, need_bias)


IMPL = SimpleNamespace(
    logprobs_fwd=logprobs_fwd, logprobs_bwd=logprobs_bwd, divergence_fwd=divergence_fwd,
    divergence_bwd=divergence_bwd, logprobs_cache_shape=logprobs_cache_shape,
    divergence_cache_shape=divergence_cache_shape,
)
