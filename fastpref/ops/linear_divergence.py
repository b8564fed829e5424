"""Autograd Function for ``linear_divergence``: the teacher side is a constant, the
student receives ``grad * d div / d zs`` chained through its head."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import get_ops


class LinearDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        s_hidden: torch.Tensor,  # (N, Ds)
        s_weight: torch.Tensor,  # (V, Ds)
        s_bias: Optional[torch.Tensor],  # (V,)
        t_hidden: torch.Tensor,  # (N, Dt)  constant
        t_weight: torch.Tensor,  # (V, Dt)  constant
        t_bias: Optional[torch.Tensor],  # (V,) constant
        labels: Optional[torch.Tensor],  # (N,) int64, only for ignore_index
        ignore_index: int,
        kind: int,
        beta: float,
        temperature: float,
        s_softcap: Optional[float],
        t_softcap: Optional[float],
        backend: str,
    ):
        t_hidden, t_weight = t_hidden.detach(), t_weight.detach()
        t_bias = None if t_bias is None else t_bias.detach()
        div, stats = get_ops(backend).divergence_fwd(
            s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, ignore_index, kind, beta,
            temperature, s_softcap, t_softcap,
        )
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, stats)
        ctx.cfg = (ignore_index, kind, beta, temperature, s_softcap, t_softcap, backend)
        return div

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, stats = ctx.saved_tensors
        ignore_index, kind, beta, temperature, s_softcap, t_softcap, backend = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and s_bias is not None
        none_tail = (None,) * 11
        if not (need_h or need_w or need_b):
            return (None, None, None) + none_tail
        d_h, d_w, d_b = get_ops(backend).divergence_bwd(
            grad.contiguous(), s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, stats,
            ignore_index, kind, beta, temperature, s_softcap, t_softcap, need_h, need_w, need_b,
        )
        return (d_h if need_h else None, d_w if need_w else None, d_b if need_b else None) + none_tail
