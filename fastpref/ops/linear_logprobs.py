"""Autograd Function for ``linear_logprobs``: saves the inputs and O(N) row statistics,
and hands arbitrary upstream gradients (for log-probs and entropy) to the backend."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import get_ops


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, D)
        weight: torch.Tensor,  # (V, D)
        labels: torch.Tensor,  # (N,) int64
        bias: Optional[torch.Tensor],  # (V,)
        ignore_index: int,
        temperature: float,
        softcap: Optional[float],
        with_entropy: bool,
        backend: str,
    ):
        ops = get_ops(backend)
        logp, entropy, lse = ops.logprobs_fwd(
            hidden, weight, labels, bias, ignore_index, temperature, softcap, with_entropy
        )
        ctx.save_for_backward(hidden, weight, labels, bias, lse, entropy)
        ctx.cfg = (ignore_index, temperature, softcap, with_entropy, backend)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor]):
        hidden, weight, labels, bias, lse, entropy = ctx.saved_tensors
        ignore_index, temperature, softcap, with_entropy, backend = ctx.cfg
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        if not (need_h or need_w or need_b):
            return (None,) * 9
        d_h, d_w, d_b = get_ops(backend).logprobs_bwd(
            grad_logp.contiguous(),
            grad_entropy.contiguous() if (with_entropy and grad_entropy is not None) else None,
            hidden, weight, labels, bias, lse,
            entropy if with_entropy else None,
            ignore_index, temperature, softcap,
            need_h, need_w, need_b and bias is not None,
        )
        return (
            d_h if need_h else None,
            d_w if need_w else None,
            None,
            d_b if (need_b and bias is not None) else None,
            None, None, None, None, None,
        )
