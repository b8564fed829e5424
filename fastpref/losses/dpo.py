"""``dpo_loss``: the DPO family (TRL ``loss_type`` names) on the fused log-prob primitive."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .. import objectives
from ..primitives import linear_logprobs
from ._common import check_sequences, pair_metrics, reduce, reference_logps, sequence_logps


def dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    reference_free: bool = False,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    rpo_alpha: Optional[float] = None,
    use_weighting: bool = False,
    ld_alpha: Optional[float] = None,
    discopop_tau: float = 0.05,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """Direct Preference Optimization and its variants (Rafailov et al. 2023; TRL's ``DPOTrainer``).

    Args:
        hidden: ``(2P, T, D)`` policy hidden states, chosen sequences first, then rejected.
        weight, bias: the policy LM head ``(V, D)``, ``(V,)``.
        labels: ``(2P, T)`` shifted targets; prompt and padding positions are ``ignore_index``.
        ref_chosen_logps, ref_rejected_logps: ``(P,)`` precomputed reference log-probs, **or**
        ref_hidden, ref_weight, ref_bias: the frozen reference model's hidden states and head, run
            in the same call without gradient.  With neither, pass ``reference_free=True``.
        beta: the KL-strength β.  loss_type: see :func:`fastpref.objectives.dpo` for all 14 forms.
        label_smoothing: ε of cDPO / robust DPO / EXO.  f_divergence, f_alpha: f-DPO scores.
        rpo_alpha: adds ``rpo_alpha · NLL`` of the chosen response (RPO; per-token mean).
        use_weighting: WPO weights ``min(1, exp(w̄_chosen + w̄_rejected))`` with ``w̄`` the mean of
            ``log p(y_t) - log Σ_v p(v)²`` over a response (one extra no-grad pass at half temperature).
        ld_alpha: LD-DPO: tokens past the shorter response of the pair count ``ld_alpha`` times.
        reduction: ``"mean" | "sum" | "none"`` over pairs.
        return_metrics: also return a dict of detached chosen/rejected log-probs, rewards
            ``β·ρ``, mean reward margin and accuracy.

    In plain PyTorch (``sigmoid``)::

        logps = (token_logps * mask).sum(-1)             # (2P,)
        rho = logps - ref_logps
        loss = -F.logsigmoid(beta * (rho[:P] - rho[P:])).mean()
    """
    p2 = check_sequences(hidden, weight, labels, bias, paired=True)
    beta_ = V.check_positive(beta, "beta")
    if rpo_alpha is not None:
        V.check_range(rpo_alpha, "rpo_alpha", 0.0, float("inf"), lo_open=False, hi_open=True)
    if ld_alpha is not None:
        V.check_range(ld_alpha, "ld_alpha", 0.0, 1.0, lo_open=False, hi_open=False)
    if use_weighting and softcap is not None:
        raise ValueError("use_weighting: WPO weights are not supported together with softcap")
    common = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend)
    pol = sequence_logps(hidden, weight, labels, bias, ld_alpha=ld_alpha, **common)
    have_pre = ref_chosen_logps is not None or ref_rejected_logps is not None
    if have_pre and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("ref_rejected_logps: ref_chosen_logps and ref_rejected_logps must be given together")
    ref = reference_logps(
        labels, precomputed=(ref_chosen_logps, ref_rejected_logps) if have_pre else None, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, hidden=hidden, weight=weight, ld_alpha=ld_alpha,
        names=("ref_chosen_logps", "ref_rejected_logps"), **common,
    )
    if ref is None and not reference_free:
        raise ValueError(
            "ref_chosen_logps: DPO needs reference log-probs (ref_chosen_logps/ref_rejected_logps or "
            "ref_hidden/ref_weight); pass reference_free=True for the reference-free form"
        )
    if ref is not None and reference_free:
        raise ValueError("reference_free: reference inputs were given together with reference_free=True")
    ref = torch.zeros_like(pol.logps) if ref is None else ref.to(pol.logps.dtype)
    half = p2 // 2
    losses = objectives.dpo(
        pol.logps[:half], pol.logps[half:], ref[:half], ref[half:], beta=beta_, loss_type=loss_type,
        label_smoothing=label_smoothing, f_divergence=f_divergence, f_alpha=f_alpha,
        chosen_lengths=pol.lengths[:half], rejected_lengths=pol.lengths[half:], discopop_tau=discopop_tau,
    )
    if use_weighting:
        losses = losses * _wpo_weights(hidden, weight, labels, bias, pol, half, **common)
    nll = -pol.logps[:half] / pol.lengths[:half].clamp(min=1)
    if rpo_alpha is not None:
        losses = losses + rpo_alpha * nll
    loss = reduce(losses, reduction)
    if not return_metrics:
        return loss
    metrics = pair_metrics(pol.logps, beta_ * (pol.logps - ref))
    metrics["nll"] = nll.detach()
    return loss, metrics


def _wpo_weights(hidden, weight, labels, bias, pol, half, *, ignore_index, temperature, softcap, backend):
    """WPO (Zhou et al. 2024, Eq. 2): ``log p(y_t) - log Σ_v p(v)² = logp_{T/2}(y_t) - logp_T(y_t)``,
    since ``log Σ p² = lse(2z) - 2 lse(z)``; averaged per response, summed over the pair, exp, ≤ 1."""
    with torch.no_grad():
        half_t = linear_logprobs(hidden.detach(), weight.detach(), labels, None if bias is None else bias.detach(),
                                 ignore_index=ignore_index, temperature=temperature / 2, backend=backend)
        adjusted = ((half_t - pol.token_logps.detach()) * (labels != ignore_index)).sum(-1)
        mean_w = adjusted / pol.lengths.clamp(min=1)
        return torch.exp(mean_w[:half] + mean_w[half:]).clamp(max=1.0)
