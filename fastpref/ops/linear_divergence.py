"""Autograd Function for ``linear_divergence``: the teacher side is a constant, the student receives
``grad * d div / d zs`` chained through its head.  A JSD needs the merged log-sum-exps before its two
KL terms: a backend given the whole vocabulary computes them in the same call."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import contract as C
from ..backends import registered_ops as R


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
        labels: Optional[torch.Tensor],  # (N,) int64, only masks rows
        opts: C.DivergenceOptions,
        backend: str,
    ):
        ctx.set_materialize_grads(False)
        t_hidden, t_weight = t_hidden.detach(), t_weight.detach()
        t_bias = None if t_bias is None else t_bias.detach()
        stats, cache = R.divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, None, opts, backend)
        rows = C.finish_divergence(stats, labels, opts)
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, rows.saved, cache)
        ctx.opts, ctx.backend = opts, backend
        entropy = rows.entropy if opts.entropy else rows.div.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return rows.div, entropy

    @staticmethod
    def backward(ctx, grad: Optional[torch.Tensor], _):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, saved, cache = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and s_bias is not None)
        none = (None,) * 6
        if grad is None or not any(needs):
            return (None, None, None) + none
        g = C.mask_divergence_grad(grad, labels, ctx.opts).contiguous()
        d_h, d_w, d_b = R.divergence_bwd(g, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache,
                                         ctx.opts, ctx.backend, needs)
        return (d_h if needs[0] else None, d_w if needs[1] else None, d_b if needs[2] else None) + none
