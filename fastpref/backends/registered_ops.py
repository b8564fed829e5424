"""The four ``torch.library`` ops of the contract (``fastpref::logprobs_fwd``, ``logprobs_bwd``,
``divergence_fwd``, ``divergence_bwd``), with fake (meta) implementations so that
``torch.compile(fullgraph=True)`` traces through them as opaque calls.

Each op takes the user's backend choice and resolves it (:func:`fastpref.backends.resolve`) before
calling that backend's Python function.  Schemas take scalars, so the options dataclasses are
flattened here (``contract.*_to_args``) and rebuilt before the backend runs: backends only ever
see the typed options.

No ``from __future__ import annotations`` here: schema inference reads real annotations.
"""

from contextlib import nullcontext
from typing import Optional as Opt

import torch
from torch import Tensor

from . import contract as C


def _stats_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grads_or_empty(grads, like_h: Tensor, like_w: Tensor):
    dh, dw, db = grads
    return (like_h.new_empty(0) if dh is None else dh, like_w.new_empty(0) if dw is None else dw,
            like_w.new_empty(0) if db is None else db)


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    dh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    db = torch.empty_like(bias) if (need_bias and bias is not None) else weight.new_empty(0)
    return dh, dw, db


def _impl(backend: str, t: Tensor, op: str, opts, local_vocab: int, other: Opt[Tensor] = None):
    """The resolved backend's contract implementation (``IMPL`` of its module)."""
    from . import backend_module, resolve

    dtype = torch.promote_types(t.dtype, other.dtype) if other is not None else t.dtype
    sharded = not C.covers_vocabulary(opts, local_vocab)
    return backend_module(resolve(backend, t.device, dtype, op, opts, sharded)).IMPL


def _no_autocast(t: Tensor):
    """Backends choose their own precision: autocast must not recast their tiles (nor ``dz``)."""
    return torch.autocast(t.device.type, enabled=False) if t.device.type in ("cpu", "cuda") else nullcontext()


# The four ops of the contract, each taking the user's backend choice (resolved inside).


@torch.library.custom_op("fastpref::logprobs_fwd", mutates_args=())
def _logprobs_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Opt[Tensor], ignore_index: int, temperature: float,
    softcap: Opt[float], logit_scale: float, flags: int, vocab_start: int, vocab_size: int, backend: str,
) -> tuple[Tensor, Tensor]:
    opts = C.logprobs_from_args(ignore_index, temperature, softcap, logit_scale, flags, vocab_start, vocab_size)
    with _no_autocast(hidden):
        return _impl(backend, hidden, "logprobs", opts, weight.shape[0]).logprobs_fwd(hidden, weight, labels, bias, opts)


@_logprobs_fwd.register_fake
def _(hidden, weight, labels, bias, *args):
    opts = C.logprobs_from_args(*args[:-1])
    impl = _impl(args[-1], hidden, "logprobs", opts, weight.shape[0])
    dt, n = _stats_dtype(hidden), hidden.shape[0]
    cache = hidden.new_empty(impl.logprobs_cache_shape(n, weight.shape[0], hidden.dtype, opts), dtype=dt)
    return hidden.new_empty(C.LP_PLANES, n, dtype=dt), cache


@torch.library.custom_op("fastpref::logprobs_bwd", mutates_args=())
def _logprobs_bwd(
    g_logp: Tensor, g_entropy: Opt[Tensor], hidden: Tensor, weight: Tensor, labels: Tensor, bias: Opt[Tensor],
    lse: Tensor, entropy: Opt[Tensor], cache: Tensor, ignore_index: int, temperature: float, softcap: Opt[float],
    logit_scale: float, flags: int, vocab_start: int, vocab_size: int, backend: str, need_hidden: bool,
    need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    opts = C.logprobs_from_args(ignore_index, temperature, softcap, logit_scale, flags, vocab_start, vocab_size)
    with _no_autocast(hidden):
        grads = _impl(backend, hidden, "logprobs", opts, weight.shape[0]).logprobs_bwd(
            g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, opts, need_hidden, need_weight,
            need_bias,
        )
    return _grads_or_empty(grads, hidden, weight)


@_logprobs_bwd.register_fake
def _(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, *args):
    return _fake_grads(hidden, weight, bias, *args[-3:])


@torch.library.custom_op("fastpref::divergence_fwd", mutates_args=())
def _divergence_fwd(
    s_hidden: Tensor, s_weight: Tensor, s_bias: Opt[Tensor], t_hidden: Tensor, t_weight: Tensor, t_bias: Opt[Tensor],
    lse_st: Opt[Tensor], kind: int, beta: float, ignore_index: int, s_temperature: float, s_softcap: Opt[float],
    s_logit_scale: float, t_temperature: float, t_softcap: Opt[float], t_logit_scale: float, entropy: bool,
    vocab_start: int, vocab_size: int, cache: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    opts = C.divergence_from_args(kind, beta, ignore_index, s_temperature, s_softcap, s_logit_scale, t_temperature,
                                  t_softcap, t_logit_scale, entropy, vocab_start, vocab_size, cache)
    impl = _impl(backend, s_hidden, "divergence", opts, s_weight.shape[0], t_hidden)
    with _no_autocast(s_hidden):
        return impl.divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, opts)


@_divergence_fwd.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, *args):
    opts = C.divergence_from_args(*args[:-1])
    impl = _impl(args[-1], s_hidden, "divergence", opts, s_weight.shape[0], t_hidden)
    dt, n = _stats_dtype(s_hidden), s_hidden.shape[0]
    shape = (0,) if lse_st is not None else impl.divergence_cache_shape(n, s_weight.shape[0], s_hidden.dtype, opts)
    return s_hidden.new_empty(C.DV_PLANES, n, dtype=dt), s_hidden.new_empty(shape, dtype=dt)


@torch.library.custom_op("fastpref::divergence_bwd", mutates_args=())
def _divergence_bwd(
    grad: Tensor, s_hidden: Tensor, s_weight: Tensor, s_bias: Opt[Tensor], t_hidden: Tensor, t_weight: Tensor,
    t_bias: Opt[Tensor], saved: Tensor, cache: Tensor, kind: int, beta: float, ignore_index: int,
    s_temperature: float, s_softcap: Opt[float], s_logit_scale: float, t_temperature: float, t_softcap: Opt[float],
    t_logit_scale: float, entropy: bool, vocab_start: int, vocab_size: int, cache_flag: bool, backend: str,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    opts = C.divergence_from_args(kind, beta, ignore_index, s_temperature, s_softcap, s_logit_scale, t_temperature,
                                  t_softcap, t_logit_scale, entropy, vocab_start, vocab_size, cache_flag)
    with _no_autocast(s_hidden):
        grads = _impl(backend, s_hidden, "divergence", opts, s_weight.shape[0], t_hidden).divergence_bwd(
            grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache, opts, need_hidden,
            need_weight, need_bias,
        )
    return _grads_or_empty(grads, s_hidden, s_weight)


@_divergence_bwd.register_fake
def _(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache, *args):
    return _fake_grads(s_hidden, s_weight, s_bias, *args[-3:])


# Typed entry points (what the autograd layer and the distributed layer call).


def logprobs_fwd(hidden, weight, labels, bias, opts: C.LogprobsOptions, backend: str):
    """-> ``(stats [LP_PLANES, N], cache)`` of the contract."""
    return torch.ops.fastpref.logprobs_fwd(hidden, weight, labels, bias, *C.logprobs_to_args(opts), backend)


def logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, opts, backend, needs):
    return torch.ops.fastpref.logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache,
                                           *C.logprobs_to_args(opts), backend, *needs)


def divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, opts, backend):
    return torch.ops.fastpref.divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st,
                                             *C.divergence_to_args(opts), backend)


def divergence_bwd(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache, opts, backend, needs):
    return torch.ops.fastpref.divergence_bwd(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved,
                                             cache, *C.divergence_to_args(opts), backend, *needs)
