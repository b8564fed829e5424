"""``dpo_loss``: the DPO family (TRL 1.16's ``loss_type`` names and conventions) on the fused
log-prob primitive."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _validate as V
from .. import objectives
from ._common import (
    check_bool,
    check_common,
    check_logps_vector,
    check_reference_head,
    check_sequences,
    pair_metrics,
    reduce,
    reference_logps,
    sequence_logps,
)


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
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    rpo_alpha: Optional[float] = None,
    use_weighting: bool = False,
    wpo_max: Optional[float] = None,
    ld_alpha: Optional[float] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """Direct Preference Optimization and its variants (Rafailov et al. 2023; TRL 1.16's ``DPOTrainer``).

    Args:
        hidden: ``(2P, T, D)`` policy hidden states, chosen sequences first, then rejected.
        weight, bias: the policy LM head ``(V, D)``, ``(V,)``.
        labels: ``(2P, T)`` shifted targets; prompt and padding positions are ``ignore_index``.
        ref_chosen_logps, ref_rejected_logps: ``(P,)`` precomputed reference log-probs, **or**
        ref_hidden, ref_weight, ref_bias: the frozen reference model's hidden states and head, run
            in the same call without gradient.  With neither, pass ``reference_free=True``.
        beta: the KL-strength β.
        loss_type: one of :data:`fastpref.objectives.DPO_LOSS_TYPES` (formulas in
            :func:`fastpref.objectives.dpo`) or a list of them, combined with ``loss_weights``
            (default all 1) as TRL 1.16: ``Σ_i weight_i · loss_i`` (e.g. MPO).  ``"sft"`` is the NLL
            of the chosen tokens (mean over every chosen token of the batch, as TRL).
        label_smoothing: ε of cDPO (``sigmoid``; TRL 1.16 ignores ε there), robust DPO, EXO (> 0), AOT.
        f_divergence, f_alpha: f-DPO scores with TRL 1.16's constants and α (``f_alpha`` is TRL's
            ``f_alpha_divergence_coef``); only for the loss types TRL allows, else a ValueError.
        rpo_alpha: RPO: adds ``rpo_alpha ·`` the chosen NLL, i.e. ``loss_type + ["sft"]`` with weight
            ``rpo_alpha`` (TRL 1.16's spelling of RPO).  The NLL uses the plain log-probs even with
            ``ld_alpha``, and is the mean over all chosen tokens of the batch.
        use_weighting: WPO (Zhou et al. 2024, Eq. 2): each pair's loss is multiplied by
            ``exp(w̄_chosen) · exp(w̄_rejected)``, ``w̄`` the mean of ``log p(y_t) - log Σ_v p(v)²`` over a
            response (``log Σ p²`` from the same fused pass, no gradient).  Unbounded, as TRL 1.16; ``wpo_max=1.0`` restores the
            clamp of earlier TRL versions.  Not with ``aot``/``aot_unpaired`` (which sort the pairs).
        ld_alpha: LD-DPO: tokens past the shorter response of the pair count ``ld_alpha`` times, in
            the policy and reference log-probs alike.
        reduction: ``"mean" | "sum" | "none"`` over pairs.
        return_metrics: also return the metrics dict of :mod:`fastpref.losses._common` (rewards ``β ρ``).

    In plain PyTorch (``sigmoid``)::

        logps = (token_logps * mask).sum(-1)             # (2P,)
        rho = logps - ref_logps
        loss = -F.logsigmoid(beta * (rho[:P] - rho[P:])).mean()
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction, return_metrics=return_metrics)
    labels = check_sequences(hidden, weight, labels, bias, opts, paired=True)
    half = hidden.shape[0] // 2
    o = objectives._dpo_options(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                                label_smoothing=label_smoothing, f_divergence=f_divergence, f_alpha=f_alpha,
                                discopop_tau=discopop_tau)
    if rpo_alpha is not None:
        rpo_alpha = V.check_range(rpo_alpha, "rpo_alpha", 0.0, float("inf"), lo_open=False, hi_open=True)
        if "sft" in o.loss_types:
            raise ValueError("rpo_alpha: loss_type already has an 'sft' term; give its weight in loss_weights")
        o = o._replace(loss_types=o.loss_types + ("sft",), loss_weights=o.loss_weights + (rpo_alpha,))
    if ld_alpha is not None:
        ld_alpha = V.check_range(ld_alpha, "ld_alpha", 0.0, 1.0, lo_open=False, hi_open=False)
    check_bool(use_weighting, "use_weighting")
    if wpo_max is not None:
        wpo_max = V.check_positive(wpo_max, "wpo_max")
    if use_weighting and {"aot", "aot_unpaired"} & set(o.loss_types):
        raise ValueError("use_weighting: WPO weights would be misaligned by aot/aot_unpaired, which sort the pairs")
    check_bool(reference_free, "reference_free")
    have_head = check_reference_head(ref_hidden, ref_weight, ref_bias, hidden, weight)
    have_pre = ref_chosen_logps is not None or ref_rejected_logps is not None
    if have_pre and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("ref_rejected_logps: ref_chosen_logps and ref_rejected_logps must be given together")
    check_logps_vector(ref_chosen_logps, "ref_chosen_logps", half, hidden)
    check_logps_vector(ref_rejected_logps, "ref_rejected_logps", half, hidden)
    if have_pre and have_head:
        raise ValueError("ref_chosen_logps: give precomputed reference log-probs or ref_hidden/ref_weight, not both")
    if not (have_pre or have_head or reference_free):
        raise ValueError(
            "ref_chosen_logps: DPO needs reference log-probs (ref_chosen_logps/ref_rejected_logps or "
            "ref_hidden/ref_weight); pass reference_free=True for the reference-free form"
        )
    if (have_pre or have_head) and reference_free:
        raise ValueError("reference_free: reference inputs were given together with reference_free=True")

    pol = sequence_logps(hidden, weight, labels, bias, opts, ld_alpha=ld_alpha, return_log_sum_sq=use_weighting)
    pre = torch.cat([ref_chosen_logps, ref_rejected_logps]) if have_pre else None
    ref = reference_logps(labels, opts, have_head=have_head, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, precomputed=pre, ld_alpha=ld_alpha)
    ref = torch.zeros_like(pol.logps) if ref is None else ref.to(pol.logps.dtype)
    lw, ll = pol.logps[:half], pol.logps[half:]
    common = dict(chosen_lengths=pol.lengths[:half], rejected_lengths=pol.lengths[half:],
                  sft_logps=pol.plain[:half] if ld_alpha is not None else None)
    losses = objectives._dpo(lw, ll, ref[:half], ref[half:], o, **common)
    if use_weighting:
        losses = losses * _wpo_weights(pol, half, wpo_max)
    loss = reduce(losses, reduction)
    if not return_metrics:
        return loss
    pref_o = o._replace(loss_types=tuple(t for t in o.loss_types if t != "sft"),
                        loss_weights=tuple(w for t, w in zip(o.loss_types, o.loss_weights) if t != "sft"))
    with torch.no_grad():
        pref = (objectives._dpo(lw, ll, ref[:half], ref[half:], pref_o, **common) if pref_o.loss_types
                else torch.zeros_like(lw))
        nll = objectives._nll_term(pol.plain[:half], pol.lengths[:half], "token") if "sft" in o.loss_types else None
    return loss, pair_metrics(pol.logps, o.beta * (pol.logps - ref), pref,
                              nll=None if nll is None else objectives._mean0(nll))


def _wpo_weights(pol, half, wpo_max):
    """WPO (Zhou et al. 2024, Eq. 2): per token ``log p(y_t) - log Σ_v p(v)²`` (the second term from the
    same fused pass), averaged per response, exp, multiplied over the pair; no gradient."""
    with torch.no_grad():
        adjusted = ((pol.token_logps - pol.token_log_sum_sq) * pol.mask).sum(-1)
        w = torch.exp(adjusted / pol.lengths.clamp(min=1))
        w = w[:half] * w[half:]
        return w if wpo_max is None else w.clamp(max=wpo_max)
