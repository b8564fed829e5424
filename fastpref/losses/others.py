"""Reference-free and unpaired losses (SPEC §4.3): SimPO, CPO, ORPO, KTO, NPO and plain NLL."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .. import objectives
from ._common import check_sequences, pair_metrics, reduce, reference_logps, sequence_logps


def _paired(hidden, weight, labels, bias, ignore_index, temperature, softcap, backend):
    p2 = check_sequences(hidden, weight, labels, bias, paired=True)
    pol = sequence_logps(hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
                         softcap=softcap, backend=backend)
    return pol, p2 // 2


def _finish(losses, reduction, return_metrics, pol, rewards):
    loss = reduce(losses, reduction)
    return (loss, pair_metrics(pol.logps, rewards)) if return_metrics else loss


def simpo_loss(hidden, weight, labels, bias=None, *, beta: float = 2.0, gamma_margin: float = 1.0,
               label_smoothing: float = 0.0, ignore_index: int = -100, temperature: float = 1.0,
               softcap: Optional[float] = None, reduction: str = "mean", return_metrics: bool = False,
               backend: str = "auto"):
    """SimPO (Meng et al. 2024): ``-log σ(β (ℓ_w/n_w - ℓ_l/n_l) - γ_margin)``, reference-free.

    ``hidden (2P, T, D)`` chosen then rejected.  Rewards in the metrics are ``β ℓ / n``::

        avg = logps / lengths
        loss = -F.logsigmoid(beta * (avg[:P] - avg[P:]) - gamma_margin).mean()
    """
    pol, half = _paired(hidden, weight, labels, bias, ignore_index, temperature, softcap, backend)
    losses = objectives.simpo(pol.logps[:half], pol.logps[half:], pol.lengths[:half], pol.lengths[half:],
                              beta=beta, gamma_margin=gamma_margin, label_smoothing=label_smoothing)
    return _finish(losses, reduction, return_metrics, pol, beta * pol.logps / pol.lengths.clamp(min=1))


def cpo_loss(hidden, weight, labels, bias=None, *, beta: float = 0.1, alpha: float = 1.0,
             label_smoothing: float = 0.0, ignore_index: int = -100, temperature: float = 1.0,
             softcap: Optional[float] = None, reduction: str = "mean", return_metrics: bool = False,
             backend: str = "auto"):
    """CPO (Xu et al. 2024): ``-log σ(β (ℓ_w - ℓ_l)) + α · NLL_w`` (NLL per chosen token)::

        loss = (-F.logsigmoid(beta * (logps[:P] - logps[P:])) - alpha * logps[:P] / lengths[:P]).mean()
    """
    pol, half = _paired(hidden, weight, labels, bias, ignore_index, temperature, softcap, backend)
    losses = objectives.cpo(pol.logps[:half], pol.logps[half:], pol.lengths[:half], beta=beta, alpha=alpha,
                            label_smoothing=label_smoothing)
    return _finish(losses, reduction, return_metrics, pol, beta * pol.logps)


def orpo_loss(hidden, weight, labels, bias=None, *, beta: float = 0.1, ignore_index: int = -100,
              temperature: float = 1.0, softcap: Optional[float] = None, reduction: str = "mean",
              return_metrics: bool = False, backend: str = "auto"):
    """ORPO (Hong et al. 2024): ``NLL_w - λ log σ(log odds_w - log odds_l)`` with ``λ = beta``,
    ``odds = p / (1 - p)`` and ``p = exp(ℓ / n)``::

        m = logps / lengths
        log_odds = (m - log1mexp(m))[:P] - (m - log1mexp(m))[P:]
        loss = (-m[:P] - beta * F.logsigmoid(log_odds)).mean()
    """
    pol, half = _paired(hidden, weight, labels, bias, ignore_index, temperature, softcap, backend)
    losses = objectives.orpo(pol.logps[:half], pol.logps[half:], pol.lengths[:half], pol.lengths[half:], beta=beta)
    return _finish(losses, reduction, return_metrics, pol, beta * pol.logps / pol.lengths.clamp(min=1))


def _unpaired_with_ref(hidden, weight, labels, bias, ref_logps, ref_hidden, ref_weight, ref_bias, common):
    check_sequences(hidden, weight, labels, bias, paired=False)
    pol = sequence_logps(hidden, weight, labels, bias, **common)
    ref = reference_logps(labels, precomputed=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, hidden=hidden, weight=weight, **common)
    if ref is None:
        raise ValueError("ref_logps: this loss needs the reference (ref_logps or ref_hidden/ref_weight)")
    return pol, ref.to(pol.logps.dtype)


def kto_loss(hidden, weight, labels, bias=None, *, desirable: torch.Tensor, ref_logps=None, ref_hidden=None,
             ref_weight=None, ref_bias=None, kl_logps=None, ref_kl_logps=None, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, ignore_index: int = -100,
             temperature: float = 1.0, softcap: Optional[float] = None, reduction: str = "mean",
             return_metrics: bool = False, backend: str = "auto"):
    """KTO (Ethayarajh et al. 2024), unpaired: each sequence is ``desirable`` (bool ``(B,)``) or not.

    ``ρ = ℓ - ℓ₀``; reference point ``z₀ = clamp(mean(ℓ_KL - ℓ₀_KL), min=0)`` from mismatched
    completions (``kl_logps``, ``ref_kl_logps``) when given, else from the batch::

        desirable:   λ_D (1 - σ(β (ρ - z₀)))
        undesirable: λ_U (1 - σ(β (z₀ - ρ)))
    """
    common = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend)
    pol, ref = _unpaired_with_ref(hidden, weight, labels, bias, ref_logps, ref_hidden, ref_weight, ref_bias, common)
    V.check_tensor(desirable, "desirable")
    if tuple(desirable.shape) != tuple(pol.logps.shape):
        raise ValueError(f"desirable: expected shape {tuple(pol.logps.shape)}, got {tuple(desirable.shape)}")
    losses = objectives.kto(pol.logps, ref, desirable, beta=beta, desirable_weight=desirable_weight,
                            undesirable_weight=undesirable_weight, kl_logps=kl_logps, ref_kl_logps=ref_kl_logps)
    loss = reduce(losses, reduction)
    if not return_metrics:
        return loss
    rewards = (beta * (pol.logps - ref)).detach()
    des = desirable.to(rewards.dtype)
    return loss, {"logps": pol.logps.detach(), "rewards": rewards,
                  "desirable_reward": (rewards * des).sum() / des.sum().clamp(min=1),
                  "undesirable_reward": (rewards * (1 - des)).sum() / (1 - des).sum().clamp(min=1)}


def npo_loss(hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
             beta: float = 0.1, ignore_index: int = -100, temperature: float = 1.0,
             softcap: Optional[float] = None, reduction: str = "mean", return_metrics: bool = False,
             backend: str = "auto"):
    """NPO (Zhang et al. 2024), unlearning on a forget set: ``-(2/β) log σ(-β (ℓ - ℓ₀))``."""
    common = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend)
    pol, ref = _unpaired_with_ref(hidden, weight, labels, bias, ref_logps, ref_hidden, ref_weight, ref_bias, common)
    loss = reduce(objectives.npo(pol.logps, ref, beta=beta), reduction)
    return (loss, {"logps": pol.logps.detach(), "rewards": (beta * (pol.logps - ref)).detach()}) \
        if return_metrics else loss


def nll_loss(hidden, weight, labels, bias=None, *, ignore_index: int = -100, temperature: float = 1.0,
             softcap: Optional[float] = None, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Plain NLL / SFT on ``hidden (..., D)``: ``reduction="mean"`` averages over counted tokens
    (0 when none), ``"sum"`` sums them, ``"none"`` gives the per-token NLL."""
    from ..primitives import linear_logprobs

    V.check_choice(reduction, "reduction", ("mean", "sum", "none"))
    logp = linear_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
                           softcap=softcap, backend=backend)
    if reduction == "none":
        return -logp
    total = -logp.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1).to(total.dtype)
