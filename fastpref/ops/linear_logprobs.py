"""Autograd Function for ``linear_logprobs``: the backend's partial statistics are finished into
per-row outputs (:func:`..backends.contract.finish_logprobs`); the inputs, ``lse``, the entropy and the
backend's cache are saved, and arbitrary upstream gradients for the log-probs and the entropy go to
the backend's backward.  The other statistics are non-differentiable."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import contract as C
from ..backends import registered_ops as R


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, D)
        weight: torch.Tensor,  # (V, D)
        labels: torch.Tensor,  # (N,) int64
        bias: Optional[torch.Tensor],  # (V,)
        opts: C.LogprobsOptions,
        backend: str,
    ):
        ctx.set_materialize_grads(False)
        stats, cache = R.logprobs_fwd(hidden, weight, labels, bias, opts, backend)
        rows = C.finish_logprobs(stats, labels, opts)
        def empty():  # one tensor per absent output: outputs must not alias each other
            return rows.lse.new_empty(0)

        entropy = rows.entropy if opts.entropy else empty()
        ctx.save_for_backward(hidden, weight, labels, bias, rows.lse, entropy, cache)
        ctx.opts, ctx.backend = opts, backend
        extras = [empty() if t is None else t for t in (rows.log_sum_sq_probs, rows.mean_logits)]
        top1 = rows.is_top1 if opts.is_top1 else labels.new_empty(0, dtype=torch.bool)
        ctx.mark_non_differentiable(*extras, top1, *(() if opts.entropy else (entropy,)))
        return rows.logp, entropy, extras[0], extras[1], top1

    @staticmethod
    def backward(ctx, g_logp, g_entropy, *_):
        hidden, weight, labels, bias, lse, entropy, cache = ctx.saved_tensors
        opts = ctx.opts
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3] and bias is not None)
        if not any(needs) or (g_logp is None and g_entropy is None):
            return None, None, None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g, ge = C.mask_logprobs_grads(g_logp, g_entropy if opts.entropy else None, labels, opts)
        d_h, d_w, d_b = R.logprobs_bwd(
            g.contiguous(), None if ge is None else ge.contiguous(), hidden, weight, labels, bias, lse,
            entropy if ge is not None else None, cache, opts, ctx.backend, needs,
        )
        return (d_h if needs[0] else None, d_w if needs[1] else None, None, d_b if needs[2] else None, None, None)
