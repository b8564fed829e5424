"""Unpaired losses with a reference: KTO (TRL 1.16's conventions) and NPO, on the fused log-prob primitive."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .. import objectives
from ._common import (
    check_common,
    check_logps_vector,
    check_reference_head,
    check_sequences,
    one_reference,
    reduce,
    reference_logps,
    sequence_logps,
)


def _with_reference(hidden, weight, labels, bias, opts, *, ref_logps, ref_hidden, ref_weight, ref_bias):
    """Checks, then the policy's and the reference's per-sequence log-probs."""
    labels = check_sequences(hidden, weight, labels, bias, opts, paired=False)
    have_head = check_reference_head(ref_hidden, ref_weight, ref_bias, hidden, weight)
    check_logps_vector(ref_logps, "ref_logps", hidden.shape[0], hidden)
    one_reference(ref_logps=ref_logps, have_head=have_head)
    if not (have_head or ref_logps is not None):
        raise ValueError("ref_logps: this loss needs the reference (ref_logps or ref_hidden/ref_weight)")
    return labels, have_head


def kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    desirable: torch.Tensor,
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    kl_logps: Optional[torch.Tensor] = None,
    ref_kl_logps: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    batch_kl: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """KTO (Ethayarajh et al. 2024) as TRL 1.16's ``KTOTrainer``, unpaired: each sequence is
    ``desirable`` (bool ``(B,)``) or not.

    ``ρ = ℓ - ℓ₀``; reference point ``z₀ = clamp(mean(ℓ_KL - ℓ₀_KL), min=0)`` (detached) from KL
    completions — mismatched prompt/completion pairs, whose policy and reference log-probs are
    ``kl_logps``, ``ref_kl_logps`` (any number of them).  Without them ``z₀ = 0``, as TRL and
    Liger-Kernel; ``batch_kl=True`` takes the clamped mean of the batch's own ``ρ`` instead
    (fastpref ≤ 0.1's default)::

        kto                desirable: λ_D (1 - σ(β (ρ - z₀)))   undesirable: λ_U (1 - σ(β (z₀ - ρ)))
        apo_zero_unpaired  desirable: λ_D (1 - σ(β ρ))          undesirable: λ_U σ(β ρ)

    Metrics: ``logps``, ``rewards`` (``β ρ``), ``reward_margin`` (mean desirable minus mean
    undesirable reward) and ``kl`` (``z₀``), as in :mod:`fastpref.losses._common`.
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction, return_metrics=return_metrics)
    o = objectives._kto_options(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                                undesirable_weight=undesirable_weight, batch_kl=batch_kl)
    labels, have_head = _with_reference(hidden, weight, labels, bias, opts, ref_logps=ref_logps,
                                        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    objectives._vector(desirable, "desirable", n=hidden.shape[0], like=hidden, like_name="hidden", kind="flag")
    objectives._check_kto_kl(kl_logps, ref_kl_logps, hidden, o)
    pol = sequence_logps(hidden, weight, labels, bias, opts)
    ref = reference_logps(labels, opts, have_head=have_head, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, precomputed=ref_logps).to(pol.logps.dtype)
    losses, z0 = objectives._kto(pol.logps, ref, desirable, o, kl_logps, ref_kl_logps)
    loss = reduce(losses, reduction)
    if not return_metrics:
        return loss
    rewards = (o.beta * (pol.logps - ref)).detach()
    des = desirable.to(torch.bool)
    margin = objectives._mean0(rewards[des]) - objectives._mean0(rewards[~des])
    return loss, {"logps": pol.logps.detach(), "rewards": rewards, "reward_margin": margin, "kl": z0.detach()}


def npo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """NPO (Zhang et al. 2024), unlearning on a forget set: ``-(2/β) log σ(-β (ℓ - ℓ₀))`` per sequence.
    Metrics: ``logps`` and ``rewards`` (``β ρ``), as in :mod:`fastpref.losses._common`."""
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction, return_metrics=return_metrics)
    beta = V.check_positive(beta, "beta")
    labels, have_head = _with_reference(hidden, weight, labels, bias, opts, ref_logps=ref_logps,
                                        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    pol = sequence_logps(hidden, weight, labels, bias, opts)
    ref = reference_logps(labels, opts, have_head=have_head, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, precomputed=ref_logps).to(pol.logps.dtype)
    loss = reduce(objectives._npo(pol.logps, ref, beta), reduction)
    if not return_metrics:
        return loss
    return loss, {"logps": pol.logps.detach(), "rewards": (beta * (pol.logps - ref)).detach()}
