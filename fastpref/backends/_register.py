"""``register_backend_ops``: turns a backend's four Python functions (the contract in
``backends/__init__.py``) into ``torch.library`` ops ``fastpref::<op>_<backend>``, with fake
(meta) implementations so ``torch.compile(fullgraph=True)`` can trace through them.

No ``from __future__ import annotations`` here: schema inference reads real annotations.
"""

from types import SimpleNamespace
from typing import Optional as Opt

import torch
from torch import Tensor


def _none_to_empty(t: Opt[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def register_backend_ops(name: str, impl: SimpleNamespace) -> None:
    """Register ``impl``'s four Python functions (the contract above) as ``fastpref::*_<name>`` ops."""
    @torch.library.custom_op(f"fastpref::logprobs_fwd_{name}", mutates_args=())
    def logprobs_fwd(
        hidden: Tensor, weight: Tensor, labels: Tensor, bias: Opt[Tensor], ignore_index: int,
        temperature: float, softcap: Opt[float], with_entropy: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return impl.logprobs_fwd(hidden, weight, labels, bias, ignore_index, temperature, softcap, with_entropy)

    @logprobs_fwd.register_fake
    def _(hidden, weight, labels, bias, ignore_index, temperature, softcap, with_entropy):
        dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n = hidden.shape[0]
        rows = hidden.new_empty(n, dtype=dt)
        return rows, hidden.new_empty(n if with_entropy else 0, dtype=dt), hidden.new_empty(n, dtype=dt)

    @torch.library.custom_op(f"fastpref::logprobs_bwd_{name}", mutates_args=())
    def logprobs_bwd(
        grad_logp: Tensor, grad_entropy: Opt[Tensor], hidden: Tensor, weight: Tensor, labels: Tensor,
        bias: Opt[Tensor], lse: Tensor, entropy: Opt[Tensor], ignore_index: int, temperature: float,
        softcap: Opt[float], need_hidden: bool, need_weight: bool, need_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dh, dw, db = impl.logprobs_bwd(
            grad_logp, grad_entropy, hidden, weight, labels, bias, lse, entropy, ignore_index, temperature,
            softcap, need_hidden, need_weight, need_bias,
        )
        return _none_to_empty(dh, hidden), _none_to_empty(dw, weight), _none_to_empty(db, weight)

    @logprobs_bwd.register_fake
    def _(grad_logp, grad_entropy, hidden, weight, labels, bias, lse, entropy, ignore_index, temperature,
          softcap, need_hidden, need_weight, need_bias):
        return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)

    @torch.library.custom_op(f"fastpref::divergence_fwd_{name}", mutates_args=())
    def divergence_fwd(
        s_hidden: Tensor, s_weight: Tensor, t_hidden: Tensor, t_weight: Tensor, labels: Opt[Tensor],
        s_bias: Opt[Tensor], t_bias: Opt[Tensor], ignore_index: int, kind: int, beta: float,
        temperature: float, s_softcap: Opt[float], t_softcap: Opt[float],
    ) -> tuple[Tensor, Tensor]:
        return impl.divergence_fwd(
            s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, ignore_index, kind, beta,
            temperature, s_softcap, t_softcap,
        )

    @divergence_fwd.register_fake
    def _(s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, ignore_index, kind, beta,
          temperature, s_softcap, t_softcap):
        dt = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        n = s_hidden.shape[0]
        return s_hidden.new_empty(n, dtype=dt), s_hidden.new_empty(n, 3, dtype=dt)

    @torch.library.custom_op(f"fastpref::divergence_bwd_{name}", mutates_args=())
    def divergence_bwd(
        grad: Tensor, s_hidden: Tensor, s_weight: Tensor, t_hidden: Tensor, t_weight: Tensor,
        labels: Opt[Tensor], s_bias: Opt[Tensor], t_bias: Opt[Tensor], stats: Tensor, ignore_index: int,
        kind: int, beta: float, temperature: float, s_softcap: Opt[float], t_softcap: Opt[float],
        need_hidden: bool, need_weight: bool, need_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dh, dw, db = impl.divergence_bwd(
            grad, s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, stats, ignore_index, kind,
            beta, temperature, s_softcap, t_softcap, need_hidden, need_weight, need_bias,
        )
        return _none_to_empty(dh, s_hidden), _none_to_empty(dw, s_weight), _none_to_empty(db, s_weight)

    @divergence_bwd.register_fake
    def _(grad, s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, stats, ignore_index, kind,
          beta, temperature, s_softcap, t_softcap, need_hidden, need_weight, need_bias):
        return _fake_grads(s_hidden, s_weight, s_bias, need_hidden, need_weight, need_bias)


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    dh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    db = torch.empty_like(bias) if (need_bias and bias is not None) else weight.new_empty(0)
    return dh, dw, db

