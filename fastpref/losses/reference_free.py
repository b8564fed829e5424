"""Reference-free paired losses: SimPO, CPO (with AlphaPO) and ORPO, on the fused log-prob primitive.

Their NLL term on the chosen responses follows TRL 1.16 and Liger-Kernel by default
(``nll_average="token"``: the mean over every chosen token of the batch); ``"sequence"`` averages
each response on its own first (fastpref ≤ 0.1).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .. import objectives
from ._common import check_common, check_sequences, pair_metrics, reduce, sequence_logps


def _paired(hidden, weight, labels, bias, opts):
    labels = check_sequences(hidden, weight, labels, bias, opts, paired=True)
    return labels, hidden.shape[0] // 2


def _finish(losses, pref, nll, reduction, return_metrics, pol, rewards):
    loss = reduce(losses, reduction)
    if not return_metrics:
        return loss
    return loss, pair_metrics(pol.logps, rewards, pref, nll=None if nll is None else objectives._mean0(nll))


def simpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    beta: float = 2.0,
    gamma_margin: float = 1.0,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    nll_average: str = "token",
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """SimPO (Meng et al. 2024): ``-log σ(β (ℓ_w/n_w - ℓ_l/n_l) - γ_margin)``, reference-free,
    plus ``nll_weight ·`` the chosen NLL (0 by default: plain SimPO).

    ``hidden (2P, T, D)`` chosen then rejected.  ``label_smoothing`` as cDPO.  TRL 1.16 spells SimPO
    as ``CPOTrainer(loss_type="simpo")`` — :func:`fastpref.cpo_loss` with ``loss_type="simpo"`` is that
    exactly (``simpo_gamma`` absolute, NLL weight ``cpo_alpha = 1``); Liger-Kernel's SimPO is this loss
    with ``nll_weight`` its ``alpha`` when ``compute_nll_loss``.  Metrics: the schema of
    :mod:`fastpref.losses._common`, rewards ``β ℓ / n``::

        avg = logps / lengths
        loss = -F.logsigmoid(beta * (avg[:P] - avg[P:]) - gamma_margin).mean()
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction, return_metrics=return_metrics)
    o = objectives._simpo_options(beta=beta, gamma_margin=gamma_margin, label_smoothing=label_smoothing,
                                  nll_weight=nll_weight, nll_average=nll_average)
    labels, half = _paired(hidden, weight, labels, bias, opts)
    pol = sequence_logps(hidden, weight, labels, bias, opts)
    lw, ll, nw, nl = pol.logps[:half], pol.logps[half:], pol.lengths[:half], pol.lengths[half:]
    losses = objectives._simpo(lw, ll, nw, nl, o)
    if not return_metrics:
        return reduce(losses, reduction)
    with torch.no_grad():
        pref = objectives._simpo(lw, ll, nw, nl, o._replace(nll_weight=0.0))
        nll = objectives._nll_term(lw, nw, o.nll_average) if o.nll_weight else None
    return _finish(losses, pref, nll, reduction, True, pol, o.beta * objectives._per_token(pol.logps, pol.lengths))


def cpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alphapo_alpha: float = 0.0,
    cpo_alpha: Optional[float] = None,
    nll_average: str = "token",
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """CPO (Xu et al. 2024) as TRL 1.16's ``CPOTrainer``: a preference term plus ``cpo_alpha ·`` the chosen NLL.

    Args:
        hidden: ``(2P, T, D)`` chosen sequences first, then rejected; labels ``(2P, T)``.
        loss_type: ``"sigmoid"`` (CPO), ``"hinge"``, ``"ipo"``, ``"simpo"`` (CPO-SimPO: per-token
            log-probs and the margin ``simpo_gamma``) or ``"alphapo"`` (AlphaPO: ``simpo`` with its
            reward shape and no NLL by default); formulas in :func:`fastpref.objectives.cpo`.
        label_smoothing: ε of the sigmoid and simpo forms.
        alphapo_alpha: AlphaPO's α (TRL's ``alpha``): rewards ``(1 - p^{-α}) / α`` instead of ``log p``,
            for every loss type; 0 keeps log-probs.
        cpo_alpha: weight of the NLL term (TRL's name); default 1, or 0 for ``"alphapo"``.  (fastpref
            ≤ 0.1 called it ``alpha``; Liger-Kernel calls it ``alpha`` too.)
        nll_average: ``"token"`` (TRL, Liger): mean over every chosen token of the batch;
            ``"sequence"``: each response's own mean first.
        return_metrics: the schema of :mod:`fastpref.losses._common`; rewards ``β r``.

    In plain PyTorch (``sigmoid``)::

        nll = -(token_logps[:P] * mask[:P]).sum() / mask[:P].sum()
        loss = -F.logsigmoid(beta * (logps[:P] - logps[P:])).mean() + cpo_alpha * nll
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction, return_metrics=return_metrics)
    o = objectives._cpo_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                simpo_gamma=simpo_gamma, alphapo_alpha=alphapo_alpha, cpo_alpha=cpo_alpha,
                                nll_average=nll_average)
    labels, half = _paired(hidden, weight, labels, bias, opts)
    pol = sequence_logps(hidden, weight, labels, bias, opts)
    lw, ll, nw, nl = pol.logps[:half], pol.logps[half:], pol.lengths[:half], pol.lengths[half:]
    losses = objectives._cpo(lw, ll, nw, nl, o)
    if not return_metrics:
        return reduce(losses, reduction)
    with torch.no_grad():
        pref = objectives._cpo(lw, ll, nw, nl, o._replace(cpo_alpha=0.0))
        nll = objectives._nll_term(lw, nw, o.nll_average) if o.cpo_alpha else None
        rw, rl = objectives._cpo_rewards(lw, ll, nw, nl, o)
    return _finish(losses, pref, nll, reduction, True, pol, o.beta * torch.cat([rw, rl]))


def orpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    nll_labels: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    nll_average: str = "token",
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """ORPO (Hong et al. 2024): ``NLL_w - λ log σ(log odds_w - log odds_l)`` with ``λ = beta``,
    ``odds = p / (1 - p)`` and ``p = exp(ℓ / n)``.

    Args:
        hidden: ``(2P, T, D)`` chosen sequences first, then rejected; labels ``(2P, T)``.
        nll_labels: ``(P, T)`` labels of the NLL term, when it should score other tokens than the odds
            (TRL 1.16's ``ORPOTrainer`` scores the prompt tokens too; Liger-Kernel's ``nll_target``).
            Costs one more fused pass over the chosen rows.  Default: the chosen half of ``labels``.
        nll_average: ``"token"`` (TRL, Liger): the NLL is the mean over every chosen token of the
            batch; ``"sequence"``: each response's ``-ℓ_w / n_w`` (fastpref ≤ 0.1).
        return_metrics: the schema of :mod:`fastpref.losses._common`; rewards ``β ℓ / n``.

    A pair with an empty response contributes no odds-ratio term (TRL gives NaN there); a response
    whose tokens are all certain (mean log-prob exactly 0, e.g. ``V = 1``) gives the limit value
    with finite gradients.  In plain PyTorch::

        m = logps / lengths
        log_odds = (m - log1mexp(m))[:P] - (m - log1mexp(m))[P:]
        nll = -(token_logps[:P] * mask[:P]).sum() / mask[:P].sum()
        loss = nll - beta * F.logsigmoid(log_odds).mean()
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction, return_metrics=return_metrics)
    beta = V.check_positive(beta, "beta")
    average = objectives._nll_average(nll_average)
    labels, half = _paired(hidden, weight, labels, bias, opts)
    if nll_labels is not None:
        nll_labels = V.check_labels(nll_labels, hidden[:half], weight.shape[0], opts.ignore_index,
                                    name="nll_labels", hidden_name="hidden[:P]")
    pol = sequence_logps(hidden, weight, labels, bias, opts)
    lw, ll, nw, nl = pol.logps[:half], pol.logps[half:], pol.lengths[:half], pol.lengths[half:]
    nll_src = {}
    if nll_labels is not None:
        nll_pol = sequence_logps(hidden[:half], weight, nll_labels, bias, opts)
        nll_src = dict(nll_logps=nll_pol.logps, nll_lengths=nll_pol.lengths)
    losses, odds = objectives._orpo(lw, ll, nw, nl, beta=beta, nll_average=average, **nll_src)
    if not return_metrics:
        return reduce(losses, reduction)
    return _finish(losses, beta * odds, losses - beta * odds, reduction, True, pol,
                   beta * objectives._per_token(pol.logps, pol.lengths))
