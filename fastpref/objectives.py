"""The loss formulas on log-probs a trainer already has (SPEC §4).

Each function takes per-sequence summed log-probs (``ℓ``) as tensors of shape ``(P,)`` (or
``(B,)`` for unpaired losses) and returns the **unreduced** per-pair (per-sequence) loss,
so that the fused losses in :mod:`fastpref.losses` and trainers with their own log-probs
share one implementation.  Notation: ``ρ = ℓ - ℓ₀`` (policy minus reference), ``w``/``l``
chosen/rejected, ``Δ = ρ_w - ρ_l``, ``n`` the number of completion tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _validate as V

DPO_LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_NEEDS_LENGTHS = ("ipo", "sigmoid_norm")


def _logsig(x: torch.Tensor) -> torch.Tensor:
    return F.logsigmoid(x)


def f_divergence_score(rho: torch.Tensor, f_divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f-DPO (Wang et al. 2023): the score that replaces ``ρ`` for each divergence.

    reverse_kl ``ρ``; forward_kl ``-e^{-ρ}``; js_divergence ``log σ(ρ)``;
    alpha_divergence ``e^{(α-1)ρ} / (α-1)`` (TRL's ``alpha`` is ``1 - α`` here).
    """
    if f_divergence == "reverse_kl":
        return rho
    if f_divergence == "forward_kl":
        return -torch.exp(-rho)
    if f_divergence == "js_divergence":
        return _logsig(rho)
    if f_divergence == "alpha_divergence":
        return torch.exp((alpha - 1.0) * rho) / (alpha - 1.0)
    raise ValueError(f"f_divergence: expected one of {list(F_DIVERGENCES)}, got {f_divergence!r}")


def dpo(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """Per-pair DPO-family loss (Rafailov et al. 2023 and TRL's ``loss_type`` variants).

    With ``x = β Δ_f`` (``Δ_f`` the f-divergence score difference; plain ``Δ`` for reverse KL)::

        sigmoid      -(1-ε) log σ(x) - ε log σ(-x)                     (cDPO when ε > 0)
        robust       (-(1-ε) log σ(x) + ε log σ(-x)) / (1 - 2ε)          (rDPO)
        hinge        relu(1 - x)                                          (SLiC)
        ipo          (ρ_w/n_w - ρ_l/n_l - 1/(2β))²                         (IPO)
        exo_pair     σ(x)(log σ(x) - log(1-ε)) + σ(-x)(log σ(-x) - log ε)   (EXO, ε=1e-3 if 0)
        nca_pair     -log σ(βρ_w) - ½ log σ(-βρ_w) - ½ log σ(-βρ_l)       (NCA)
        bco_pair     -log σ(βρ_w) - log σ(-βρ_l)                           (BCO, without its running shift)
        sppo_hard    (ρ_w - 1/(2β))² + (ρ_l + 1/(2β))²                     (SPPO)
        aot          sigmoid loss on sort(ℓ_w - ℓ_l) - sort(ℓ₀_w - ℓ₀_l) over the batch (AOT)
        aot_unpaired sigmoid loss on sort(ρ_w) - sort(ρ_l) over the batch
        apo_zero     (1 - σ(βρ_w)) + σ(βρ_l)                               (APO)
        apo_down     σ(βρ_w) + (1 - σ(x))
        discopop     m = σ(x/τ): (1-m)(-log σ(x)) + m e^{-x}              (DiscoPOP, τ = 0.05)
        sigmoid_norm -log σ(β(ρ_w/n_w - ρ_l/n_l))

    Missing reference log-probs mean the reference-free form (``ℓ₀ = 0``).
    """
    beta = V.check_positive(beta, "beta")
    V.check_choice(loss_type, "loss_type", DPO_LOSS_TYPES)
    V.check_choice(f_divergence, "f_divergence", F_DIVERGENCES)
    if f_divergence == "alpha_divergence":
        V.check_range(f_alpha, "f_alpha", 0.0, 1.0, lo_open=True, hi_open=True)
    eps = V.check_range(label_smoothing, "label_smoothing", 0.0, 0.5, lo_open=False, hi_open=True)
    if loss_type in _NEEDS_LENGTHS and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"chosen_lengths: loss_type={loss_type!r} needs chosen_lengths and rejected_lengths")
    ref_w = torch.zeros_like(chosen_logps) if ref_chosen_logps is None else ref_chosen_logps
    ref_l = torch.zeros_like(rejected_logps) if ref_rejected_logps is None else ref_rejected_logps
    rho_w, rho_l = chosen_logps - ref_w, rejected_logps - ref_l

    if loss_type in ("ipo", "sigmoid_norm"):
        margin = rho_w / chosen_lengths.clamp(min=1) - rho_l / rejected_lengths.clamp(min=1)
        if loss_type == "ipo":
            return (margin - 1.0 / (2.0 * beta)) ** 2
        return -_logsig(beta * margin)
    if loss_type == "nca_pair":
        return -_logsig(beta * rho_w) - 0.5 * _logsig(-beta * rho_w) - 0.5 * _logsig(-beta * rho_l)
    if loss_type == "bco_pair":
        return -_logsig(beta * rho_w) - _logsig(-beta * rho_l)
    if loss_type == "sppo_hard":
        return (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1.0 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l)
    if loss_type == "aot":
        delta = torch.sort(chosen_logps - rejected_logps, dim=0)[0] - torch.sort(ref_w - ref_l, dim=0)[0]
        return -(1.0 - eps) * _logsig(beta * delta) - eps * _logsig(-beta * delta)
    if loss_type == "aot_unpaired":
        delta = torch.sort(rho_w, dim=0)[0] - torch.sort(rho_l, dim=0)[0]
        return -(1.0 - eps) * _logsig(beta * delta) - eps * _logsig(-beta * delta)

    x = beta * (f_divergence_score(rho_w, f_divergence, f_alpha) - f_divergence_score(rho_l, f_divergence, f_alpha))
    if loss_type == "sigmoid":
        return -(1.0 - eps) * _logsig(x) - eps * _logsig(-x)
    if loss_type == "robust":
        return (-(1.0 - eps) * _logsig(x) + eps * _logsig(-x)) / (1.0 - 2.0 * eps)
    if loss_type == "hinge":
        return torch.relu(1.0 - x)
    if loss_type == "exo_pair":
        e = eps if eps > 0 else 1e-3
        return torch.sigmoid(x) * (_logsig(x) - math.log1p(-e)) + torch.sigmoid(-x) * (_logsig(-x) - math.log(e))
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rho_w) + (1.0 - torch.sigmoid(x))
    # discopop
    tau = V.check_positive(discopop_tau, "discopop_tau")
    m = torch.sigmoid(x / tau)
    return (1.0 - m) * (-_logsig(x)) + m * torch.exp(-x)


def pmle(logps_a: torch.Tensor, logps_b: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Preference MLE (arXiv 2506.01523, §4.1): ``-log σ(γ (ℓ(a⁺) - ℓ(a⁻)))``, ``a`` preferred."""
    gamma = V.check_positive(gamma, "gamma")
    return -_logsig(gamma * (logps_a - logps_b))


def preference_distillation(
    logps_a: torch.Tensor,
    logps_b: torch.Tensor,
    *,
    gamma: float,
    reward_a: Optional[torch.Tensor] = None,
    reward_b: Optional[torch.Tensor] = None,
    target_prob: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Preference distillation (arXiv 2506.01523, §4.2): ``BCE_with_logits(γ(ℓ(a₁) - ℓ(a₂)), p)``.

    ``p = σ(R̂(a₁) - R̂(a₂))`` from a Bradley-Terry reward model, or a given ``target_prob``
    (exactly one of the two).  Equals ``KL(Bern(p) || Bern(σ(γΔℓ)))`` up to a constant; the
    gradient on ``ℓ(a₁)`` is ``γ (σ(γΔℓ) - p)``.  Symmetric in the pair.
    """
    gamma = V.check_positive(gamma, "gamma")
    have_rewards = reward_a is not None or reward_b is not None
    if have_rewards == (target_prob is not None):
        raise ValueError("target_prob: give exactly one of (reward_a and reward_b) or target_prob")
    if have_rewards:
        if reward_a is None or reward_b is None:
            raise ValueError("reward_b: reward_a and reward_b must be given together")
        p = torch.sigmoid(reward_a.to(logps_a.dtype) - reward_b.to(logps_a.dtype))
    else:
        p = target_prob.to(logps_a.dtype)
    return F.binary_cross_entropy_with_logits(gamma * (logps_a - logps_b), p.detach(), reduction="none")


def leave_one_out_baseline(values: torch.Tensor, k: int) -> torch.Tensor:
    """``b_i = mean_{j != i} values_j`` within consecutive groups of ``k`` (0 when ``k == 1``)."""
    if k == 1:
        return torch.zeros_like(values)
    groups = values.reshape(-1, k)
    return ((groups.sum(1, keepdim=True) - groups) / (k - 1)).reshape(-1)


def score_function_surrogate(logps: torch.Tensor, coef: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward value ``value``, gradient ``coef * ∇ℓ`` (coef and value treated as constants)."""
    return value.detach() + coef.detach() * (logps - logps.detach())


def reverse_kl(
    logps: torch.Tensor,
    rewards: torch.Tensor,
    ref_logps: Optional[torch.Tensor] = None,
    *,
    beta: float,
    gamma: float,
    num_samples_per_prompt: int,
    old_logps: Optional[torch.Tensor] = None,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """Reverse-KL minimisation (arXiv 2506.01523, §4.3) as a policy-gradient surrogate.

    Objective ``-E_{a~π}[R̂(a)] - γ H(π) + β KL(π || π₀)``, optimum
    ``π ∝ π₀^{β/(β+γ)} exp(R̂/(β+γ))``.  Per sample, shaped reward
    ``r' = R̂ - β(ℓ - ℓ₀) - γℓ``, leave-one-out baseline ``b`` over the ``k`` samples of its
    prompt (rows grouped prompt by prompt), advantage ``A = r' - b`` (a constant)::

        loss = -A * ℓ                                    # value shown as -A*ℓ; gradient -A ∇ℓ
        loss = -min(ρ A, clip(ρ, 1-ε, 1+ε) A),  ρ = exp(ℓ - ℓ_old)   # with old_logps (PPO)

    ``ref_logps=None`` drops the KL term (``β`` must then be 0).
    """
    beta = V.check_range(beta, "beta", 0.0, math.inf, lo_open=False, hi_open=True)
    gamma = V.check_range(gamma, "gamma", 0.0, math.inf, lo_open=False, hi_open=True)
    k = V.check_int(num_samples_per_prompt, "num_samples_per_prompt")
    if k < 1 or logps.shape[0] % k:
        raise ValueError(
            f"num_samples_per_prompt: expected a positive divisor of the number of sequences "
            f"{logps.shape[0]}, got {k}"
        )
    if ref_logps is None and beta > 0:
        raise ValueError("ref_logps: beta > 0 needs reference log-probs (or reference hidden states)")
    kl = (logps - ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    shaped = rewards.to(logps.dtype) - beta * kl - gamma * logps
    adv = (shaped - leave_one_out_baseline(shaped, k)).detach()
    if old_logps is None:
        return -adv * logps
    V.check_range(clip_eps, "clip_eps", 0.0, 1.0, lo_open=True, hi_open=True)
    ratio = torch.exp(logps - old_logps.detach())
    return -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)


def sampled_kl(logps: torch.Tensor, ref_logps: torch.Tensor, *, num_samples_per_prompt: int = 1) -> torch.Tensor:
    """Score-function estimate of ``KL(π || π₀)`` on samples ``y ~ π``: value ``ℓ - ℓ₀``, gradient
    ``(ℓ - ℓ₀ - b) ∇ℓ`` with the leave-one-out baseline ``b`` over each prompt's samples."""
    k = V.check_int(num_samples_per_prompt, "num_samples_per_prompt")
    if k < 1 or logps.shape[0] % k:
        raise ValueError(
            f"num_samples_per_prompt: expected a positive divisor of the number of sequences "
            f"{logps.shape[0]}, got {k}"
        )
    kl = logps - ref_logps.detach()
    return score_function_surrogate(logps, kl - leave_one_out_baseline(kl.detach(), k), kl)


def simpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta=2.0, gamma_margin=1.0,
          label_smoothing=0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024): ``-log σ(β(ℓ_w/n_w - ℓ_l/n_l) - γ_margin)`` (label smoothing as cDPO)."""
    beta = V.check_positive(beta, "beta")
    gamma_margin = V.check_finite(gamma_margin, "gamma_margin")
    eps = V.check_range(label_smoothing, "label_smoothing", 0.0, 0.5, lo_open=False, hi_open=True)
    x = beta * (chosen_logps / chosen_lengths.clamp(min=1) - rejected_logps / rejected_lengths.clamp(min=1)) - gamma_margin
    return -(1.0 - eps) * _logsig(x) - eps * _logsig(-x)


def cpo(chosen_logps, rejected_logps, chosen_lengths, *, beta=0.1, alpha=1.0, label_smoothing=0.0) -> torch.Tensor:
    """CPO (Xu et al. 2024): ``-log σ(β(ℓ_w - ℓ_l)) + α · NLL_w`` with ``NLL_w = -ℓ_w / n_w``."""
    beta = V.check_positive(beta, "beta")
    alpha = V.check_range(alpha, "alpha", 0.0, math.inf, lo_open=False, hi_open=True)
    eps = V.check_range(label_smoothing, "label_smoothing", 0.0, 0.5, lo_open=False, hi_open=True)
    x = beta * (chosen_logps - rejected_logps)
    return -(1.0 - eps) * _logsig(x) - eps * _logsig(-x) - alpha * chosen_logps / chosen_lengths.clamp(min=1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x < 0``, accurate on both sides of ``-log 2`` (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta=0.1) -> torch.Tensor:
    """ORPO (Hong et al. 2024): ``NLL_w - λ log σ(log odds_w - log odds_l)``, ``λ = beta``,
    ``odds = p/(1-p)`` with ``p = exp(ℓ/n)`` (per-token mean log-prob)."""
    beta = V.check_positive(beta, "beta")
    mw = chosen_logps / chosen_lengths.clamp(min=1)
    ml = rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = (mw - _log1mexp(mw)) - (ml - _log1mexp(ml))
    return -mw - beta * _logsig(log_odds)


def kto(logps, ref_logps, desirable, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
        kl_logps=None, ref_kl_logps=None) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024), unpaired: ``ρ = ℓ - ℓ₀``, reference point
    ``z₀ = clamp(mean(ℓ_KL - ℓ₀_KL), min=0)`` (detached; from mismatched completions when given,
    else from the batch itself)::

        desirable:   λ_D (1 - σ(β(ρ - z₀)))
        undesirable: λ_U (1 - σ(β(z₀ - ρ)))
    """
    beta = V.check_positive(beta, "beta")
    lam_d = V.check_range(desirable_weight, "desirable_weight", 0.0, math.inf, lo_open=False, hi_open=True)
    lam_u = V.check_range(undesirable_weight, "undesirable_weight", 0.0, math.inf, lo_open=False, hi_open=True)
    rho = logps - ref_logps
    if (kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("ref_kl_logps: kl_logps and ref_kl_logps must be given together")
    kl_src = (kl_logps - ref_kl_logps) if kl_logps is not None else rho
    z0 = kl_src.detach().mean().clamp(min=0) if kl_src.numel() else rho.new_zeros(())
    des = desirable.to(torch.bool)
    return torch.where(
        des, lam_d * (1.0 - torch.sigmoid(beta * (rho - z0))), lam_u * (1.0 - torch.sigmoid(beta * (z0 - rho)))
    )


def npo(logps, ref_logps, *, beta=0.1) -> torch.Tensor:
    """NPO (Zhang et al. 2024), unlearning: ``-(2/β) log σ(-β(ℓ - ℓ₀))``."""
    beta = V.check_positive(beta, "beta")
    return -(2.0 / beta) * _logsig(-beta * (logps - ref_logps))
