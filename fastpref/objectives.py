"""The loss formulas on log-probs a trainer already has.

Each public function takes per-sequence summed log-probs (``ℓ``) as tensors of shape ``(P,)`` (or
``(B,)`` for unpaired losses) and returns the **unreduced** per-pair (per-sequence) loss, so that
the fused losses in :mod:`fastpref.losses` and trainers with their own log-probs share one
implementation.  Notation: ``ρ = ℓ - ℓ₀`` (policy minus reference), ``w``/``l`` chosen/rejected,
``n`` the number of completion tokens of a response.

Every public function checks its tensors (type, floating dtype, shape — nothing is broadcast —
and device) and its options.  The fused losses check once at their own boundary, then call the
private ``_*_options`` / ``_*`` pairs below, so nothing is validated twice.

Where TRL 1.16 defines a loss, its formula and conventions are the default here; the docstring
of each function says where fastpref offers more (and how to get TRL's behaviour).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _validate as V

__all__ = [
    "CPO_LOSS_TYPES", "DPO_LOSS_TYPES", "F_DIVERGENCES", "F_DIVERGENCE_LOSS_TYPES", "KTO_LOSS_TYPES", "NLL_AVERAGES",
    "cpo", "dpo", "f_divergence_score", "kto", "leave_one_out_baseline", "npo", "orpo", "pmle",
    "preference_distillation", "reverse_kl", "sampled_kl", "score_function_surrogate", "simpo",
]

DPO_LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation leaves a β·log Z(x) term that only cancels in the chosen - rejected score
# difference, so (as in TRL 1.16) only the losses built on that difference accept another f-divergence.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
NLL_AVERAGES = ("token", "sequence")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- tensor checks


def _vector(x: object, name: str, *, n: Optional[int] = None, like: Optional[torch.Tensor] = None,
            like_name: str = "", kind: str = "float", any_length: bool = False) -> torch.Tensor:
    """A 1-D tensor of ``n`` entries (``n`` defaults to ``like``'s length unless ``any_length``) on
    ``like``'s device.  ``kind``: ``"float"`` (floating dtype), ``"count"`` (integer or floating),
    ``"flag"`` (bool or integer)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if kind == "float" and x.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a floating dtype (fp16/bf16/fp32/fp64), got {x.dtype}")
    if kind == "count" and (x.dtype == torch.bool or x.dtype.is_complex):
        raise TypeError(f"{name}: expected an integer or floating dtype (token counts), got {x.dtype}")
    if kind == "flag" and (x.dtype.is_floating_point or x.dtype.is_complex):
        raise TypeError(f"{name}: expected a bool (or integer 0/1) dtype, got {x.dtype}")
    of = f" (that of {like_name})" if like_name else ""
    shape_of = ""
    if n is None and like is not None and not any_length:
        n, shape_of = like.shape[0], of
    if x.dim() != 1 or (n is not None and x.shape[0] != n):
        want = f"({n},)" if n is not None else "(N,)"
        raise ValueError(f"{name}: expected shape {want}{shape_of}, got {tuple(x.shape)}")
    if like is not None and x.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}{of}, got {x.device}")
    return x


def _pair_vectors(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                  chosen_lengths=None, rejected_lengths=None):
    _vector(chosen_logps, "chosen_logps")
    for t, name, kind in ((rejected_logps, "rejected_logps", "float"), (ref_chosen_logps, "ref_chosen_logps", "float"),
                          (ref_rejected_logps, "ref_rejected_logps", "float"),
                          (chosen_lengths, "chosen_lengths", "count"), (rejected_lengths, "rejected_lengths", "count")):
        if t is not None:
            _vector(t, name, like=chosen_logps, like_name="chosen_logps", kind=kind)


def _k_divides(k: object, n: int, name: str = "num_samples_per_prompt") -> int:
    k = V.check_int(k, name)
    if k < 1 or n % k:
        raise ValueError(f"{name}: expected a positive divisor of the number of sequences {n}, got {k}")
    return k


def _nll_average(value: object) -> str:
    return V.check_choice(value, "nll_average", NLL_AVERAGES)


def _nonneg(value: object, name: str) -> float:
    return V.check_range(value, name, 0.0, math.inf, lo_open=False, hi_open=True)


def _smoothing(value: object) -> float:
    return V.check_range(value, "label_smoothing", 0.0, 0.5, lo_open=False, hi_open=True)


# ----------------------------------------------------------------------------- small numerics


def _logsig(x: torch.Tensor) -> torch.Tensor:
    return F.logsigmoid(x)


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-ε) log σ(x) - ε log σ(-x)`` (the plain logistic loss at ε = 0)."""
    out = -_logsig(x)
    return out if eps == 0.0 else (1.0 - eps) * out - eps * _logsig(-x)


def _per_token(sums: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean ``sums / n`` (0 for a sequence without tokens)."""
    return sums / lengths.to(sums.dtype).clamp(min=1)


def _nll_term(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor, average: str) -> torch.Tensor:
    """The NLL of the chosen responses, one value per pair ``(P,)``.

    ``"token"`` (TRL 1.16, Liger-Kernel): the mean over every chosen token of the batch,
    ``-Σ ℓ_w / Σ n_w``, repeated for each pair (so the mean over pairs is that token mean).
    ``"sequence"``: each response's own mean, ``-ℓ_w / n_w``.
    """
    if average == "sequence":
        return -_per_token(chosen_logps, chosen_lengths)
    total = -chosen_logps.sum()
    count = chosen_lengths.to(chosen_logps.dtype).sum().clamp(min=1)
    return (total / count).expand(chosen_logps.shape)


def _mean0(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (not NaN) over an empty tensor."""
    return x.mean() if x.numel() else x.sum()


# ----------------------------------------------------------------------------- f-divergence scores


_ALPHA_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 700.0}


def _f_score(rho: torch.Tensor, f_divergence: str, alpha: float) -> torch.Tensor:
    if f_divergence == "reverse_kl":
        return rho
    if f_divergence == "forward_kl":
        return -torch.expm1(-rho)  # 1 - e^{-ρ}
    if f_divergence == "js_divergence":
        return math.log(2.0) + _logsig(rho)  # log(2t / (1 + t)), t = e^ρ
    if abs(alpha - 1.0) < 1e-6:  # alpha_divergence tends to reverse KL as α -> 1
        return rho
    t = ((alpha - 1.0) * rho).clamp(max=_ALPHA_CLAMP[rho.dtype])  # as TRL 1.16, so that e^t stays finite
    return torch.expm1(t) / (alpha - 1.0)


def f_divergence_score(rho: torch.Tensor, f_divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f-DPO (Wang et al. 2023): the score ``f'(e^ρ)`` that replaces ``ρ`` for each divergence, as TRL 1.16.

    reverse_kl ``ρ``; forward_kl ``1 - e^{-ρ}``; js_divergence ``log 2 + log σ(ρ)``;
    alpha_divergence ``(e^{(α-1)ρ} - 1) / (α - 1)`` with TRL 1.16's ``f_alpha_divergence_coef`` as ``α``
    (``α → 1`` gives reverse KL; ``(α-1)ρ`` is clamped above at 80 in fp32/bf16, 11 in fp16, as TRL
    does, so the exponential stays finite).  The constants matter once scores are divided by lengths
    (``ipo``, ``sigmoid_norm``).
    """
    if not isinstance(rho, torch.Tensor):
        raise TypeError(f"rho: expected a torch.Tensor, got {type(rho).__name__}")
    V.check_choice(f_divergence, "f_divergence", F_DIVERGENCES)
    return _f_score(rho, f_divergence, V.check_finite(alpha, "alpha"))


# ----------------------------------------------------------------------------- DPO family


class _DPOOptions(NamedTuple):
    beta: float
    loss_types: tuple
    loss_weights: tuple
    label_smoothing: float
    f_divergence: str
    f_alpha: float
    discopop_tau: float


def _dpo_options(*, beta, loss_type, loss_weights, label_smoothing, f_divergence, f_alpha,
                 discopop_tau) -> _DPOOptions:
    beta = V.check_positive(beta, "beta")
    if isinstance(loss_type, str):
        types = (loss_type,)
    elif isinstance(loss_type, (list, tuple)) and loss_type and all(isinstance(t, str) for t in loss_type):
        types = tuple(loss_type)
    else:
        raise TypeError(f"loss_type: expected a str or a non-empty list of str, got {loss_type!r}")
    for t in types:
        V.check_choice(t, "loss_type", DPO_LOSS_TYPES)
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        if not isinstance(loss_weights, (list, tuple)):
            raise TypeError(f"loss_weights: expected a list of floats, got {type(loss_weights).__name__}")
        if len(loss_weights) != len(types):
            raise ValueError(f"loss_weights: expected {len(types)} weights (one per loss_type), got {len(loss_weights)}")
        weights = tuple(V.check_finite(w, "loss_weights") for w in loss_weights)
    eps = _smoothing(label_smoothing)
    if "exo_pair" in types and eps == 0.0:
        raise ValueError("label_smoothing: loss_type='exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3)")
    V.check_choice(f_divergence, "f_divergence", F_DIVERGENCES)
    f_alpha = V.check_finite(f_alpha, "f_alpha")
    if f_divergence != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ValueError(
                f"f_divergence: {f_divergence!r} is only defined for loss types {list(F_DIVERGENCE_LOSS_TYPES)} "
                f"(the others have no f-divergence generalisation), got loss_type {bad}"
            )
    tau = V.check_positive(discopop_tau, "discopop_tau")
    return _DPOOptions(beta, types, weights, eps, f_divergence, f_alpha, tau)


def _dpo_one(loss_type, o: _DPOOptions, rho_w, rho_l, s_w, s_l, lw, ll, rw, rl, n_w, n_l, sft):
    beta, eps = o.beta, o.label_smoothing
    x = beta * (s_w - s_l)
    if loss_type == "sigmoid":
        return _smoothed(x, eps)
    if loss_type == "robust":
        return (-(1.0 - eps) * _logsig(x) + eps * _logsig(-x)) / (1.0 - 2.0 * eps)
    if loss_type == "hinge":
        return torch.relu(1.0 - x)
    if loss_type in _LENGTH_NORMALISED:  # the f-score is taken before the division by length, as TRL 1.16
        margin = _per_token(s_w, n_w) - _per_token(s_l, n_l)
        return (margin - 0.5 / beta) ** 2 if loss_type == "ipo" else -_logsig(beta * margin)
    if loss_type == "exo_pair":
        return (torch.sigmoid(x) * (_logsig(x) - math.log1p(-eps))
                + torch.sigmoid(-x) * (_logsig(-x) - math.log(eps)))
    if loss_type == "nca_pair":
        return -_logsig(beta * rho_w) - 0.5 * _logsig(-beta * rho_w) - 0.5 * _logsig(-beta * rho_l)
    if loss_type == "bco_pair":
        return -_logsig(beta * rho_w) - _logsig(-beta * rho_l)
    if loss_type == "sppo_hard":
        return (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
    if loss_type == "aot":
        delta = torch.sort(lw - ll, dim=0)[0] - torch.sort(rw - rl, dim=0)[0]
        return _smoothed(beta * delta, eps)
    if loss_type == "aot_unpaired":
        return _smoothed(beta * (torch.sort(rho_w, dim=0)[0] - torch.sort(rho_l, dim=0)[0]), eps)
    if loss_type == "apo_zero":
        return (1.0 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rho_w) + (1.0 - torch.sigmoid(beta * (rho_w - rho_l)))
    if loss_type == "discopop":
        # m e^{-x} as exp(-x + log σ(x/τ)): finite where e^{-x} alone overflows (x < -88.7 in fp32)
        m = torch.sigmoid(x / o.discopop_tau)
        return (1.0 - m) * (-_logsig(x)) + torch.exp(_logsig(x / o.discopop_tau) - x)
    assert loss_type == "sft"
    return sft


def _dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, o: _DPOOptions, *,
         chosen_lengths=None, rejected_lengths=None, sft_logps=None) -> torch.Tensor:
    rw = torch.zeros_like(chosen_logps) if ref_chosen_logps is None else ref_chosen_logps.to(chosen_logps.dtype)
    rl = torch.zeros_like(rejected_logps) if ref_rejected_logps is None else ref_rejected_logps.to(chosen_logps.dtype)
    rho_w, rho_l = chosen_logps - rw, rejected_logps - rl
    s_w, s_l = _f_score(rho_w, o.f_divergence, o.f_alpha), _f_score(rho_l, o.f_divergence, o.f_alpha)
    sft = None
    if "sft" in o.loss_types:
        sft = _nll_term(chosen_logps if sft_logps is None else sft_logps, chosen_lengths, "token")
    total = None
    for t, w in zip(o.loss_types, o.loss_weights):
        term = _dpo_one(t, o, rho_w, rho_l, s_w, s_l, chosen_logps, rejected_logps, rw, rl, chosen_lengths,
                        rejected_lengths, sft)
        term = term if w == 1.0 else w * term
        total = term if total is None else total + term
    return total


def dpo(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    sft_logps: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-pair DPO-family loss (Rafailov et al. 2023 and TRL 1.16's ``loss_type`` variants).

    ``s = f'(e^ρ)`` is the f-divergence score (:func:`f_divergence_score`; ``s = ρ`` for the default
    reverse KL) and ``x = β (s_w - s_l)``::

        sigmoid      -(1-ε) log σ(x) - ε log σ(-x)             (ε = label_smoothing: cDPO; TRL 1.16 has ε = 0)
        robust       (-(1-ε) log σ(x) + ε log σ(-x)) / (1 - 2ε)  (rDPO)
        hinge        relu(1 - x)                                 (SLiC)
        ipo          (s_w/n_w - s_l/n_l - 1/(2β))²               (IPO, per-token scores as TRL)
        exo_pair     σ(x)(log σ(x) - log(1-ε)) + σ(-x)(log σ(-x) - log ε)   (EXO, needs ε > 0)
        nca_pair     -log σ(βρ_w) - ½ log σ(-βρ_w) - ½ log σ(-βρ_l)
        bco_pair     -log σ(βρ_w) - log σ(-βρ_l)                (without BCO's running shift)
        sppo_hard    (ρ_w - 1/(2β))² + (ρ_l + 1/(2β))²
        aot          -(1-ε) log σ(βd) - ε log σ(-βd),  d = sort(ℓ_w - ℓ_l) - sort(ℓ₀_w - ℓ₀_l) over the batch
        aot_unpaired the same with d = sort(ρ_w) - sort(ρ_l)
        apo_zero     (1 - σ(βρ_w)) + σ(βρ_l)
        apo_down     σ(βρ_w) + (1 - σ(β(ρ_w - ρ_l)))
        discopop     m = σ(x/τ): (1-m)(-log σ(x)) + m e^{-x}     (DiscoPOP, τ = discopop_tau)
        sft          -Σ ℓ_w / Σ n_w: the NLL of every chosen token of the batch, repeated per pair
        sigmoid_norm -log σ(β(s_w/n_w - s_l/n_l))

    ``loss_type`` may be a list, combined with ``loss_weights`` (default all 1) as TRL 1.16 does:
    ``Σ_i weight_i · loss_i`` per pair (e.g. RPO = ``["sigmoid", "sft"]`` with ``[1, α]``, MPO).
    ``f_divergence`` other than ``"reverse_kl"`` is only accepted by sigmoid, sigmoid_norm, hinge,
    ipo, exo_pair, robust, discopop and sft, as in TRL 1.16.  Missing reference log-probs mean the
    reference-free form (``ℓ₀ = 0``).  ``ipo``, ``sigmoid_norm`` and ``sft`` need ``chosen_lengths``
    (and ``rejected_lengths``); ``sft_logps`` (``(P,)``) replaces ``chosen_logps`` in the sft term
    (LD-DPO weights only the preference term).
    """
    o = _dpo_options(beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
                     f_divergence=f_divergence, f_alpha=f_alpha, discopop_tau=discopop_tau)
    _pair_vectors(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                  rejected_lengths)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_rejected_logps: ref_chosen_logps and ref_rejected_logps must be given together")
    if sft_logps is not None:
        _vector(sft_logps, "sft_logps", like=chosen_logps, like_name="chosen_logps")
    needs = [t for t in o.loss_types if t in _LENGTH_NORMALISED + ("sft",)]
    if needs and (chosen_lengths is None or (rejected_lengths is None and needs != ["sft"])):
        raise ValueError(f"chosen_lengths: loss_type {needs} needs chosen_lengths and rejected_lengths")
    return _dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, o,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, sft_logps=sft_logps)


# ----------------------------------------------------------------------------- the distribution-learning objectives


def _pmle(logps_a, logps_b, gamma):
    return -_logsig(gamma * (logps_a - logps_b))


def pmle(logps_a: torch.Tensor, logps_b: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Preference MLE (arXiv 2506.01523, §4.1): ``-log σ(γ (ℓ(a⁺) - ℓ(a⁻)))``, ``a`` preferred."""
    gamma = V.check_positive(gamma, "gamma")
    _vector(logps_a, "logps_a")
    _vector(logps_b, "logps_b", like=logps_a, like_name="logps_a")
    return _pmle(logps_a, logps_b, gamma)


def _preference_targets(n: int, like: torch.Tensor, reward_a, reward_b, target_prob, like_name="logps_a") -> None:
    """Exactly one target source, each ``(n,)`` (one per pair) on ``like``'s device."""
    have_rewards = reward_a is not None or reward_b is not None
    if have_rewards == (target_prob is not None):
        raise ValueError("target_prob: give exactly one of (reward_a and reward_b) or target_prob")
    if have_rewards and (reward_a is None or reward_b is None):
        raise ValueError("reward_b: reward_a and reward_b must be given together")
    for t, name in ((reward_a, "reward_a"), (reward_b, "reward_b"), (target_prob, "target_prob")):
        if t is not None:
            _vector(t, name, n=n, like=like, like_name=like_name)


def _preference_distillation(logps_a, logps_b, gamma, reward_a, reward_b, target_prob):
    if target_prob is None:
        p = torch.sigmoid(reward_a.to(logps_a.dtype) - reward_b.to(logps_a.dtype))
    else:
        p = target_prob.to(logps_a.dtype)
    return F.binary_cross_entropy_with_logits(gamma * (logps_a - logps_b), p.detach(), reduction="none")


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

    ``p = σ(R̂(a₁) - R̂(a₂))`` from a Bradley-Terry reward model, or a given ``target_prob`` in
    ``[0, 1]`` (exactly one of the two; each ``(P,)``).  Equals ``KL(Bern(p) || Bern(σ(γΔℓ)))`` up
    to a constant; the gradient on ``ℓ(a₁)`` is ``γ (σ(γΔℓ) - p)``.  Symmetric in the pair.
    """
    gamma = V.check_positive(gamma, "gamma")
    _vector(logps_a, "logps_a")
    _vector(logps_b, "logps_b", like=logps_a, like_name="logps_a")
    _preference_targets(logps_a.shape[0], logps_a, reward_a, reward_b, target_prob)
    return _preference_distillation(logps_a, logps_b, gamma, reward_a, reward_b, target_prob)


def _leave_one_out(values: torch.Tensor, k: int) -> torch.Tensor:
    if k == 1:
        return torch.zeros_like(values)
    groups = values.reshape(-1, k)
    return ((groups.sum(1, keepdim=True) - groups) / (k - 1)).reshape(-1)


def leave_one_out_baseline(values: torch.Tensor, k: int) -> torch.Tensor:
    """``b_i = mean_{j != i} values_j`` within consecutive groups of ``k`` (0 when ``k == 1``)."""
    _vector(values, "values")
    return _leave_one_out(values, _k_divides(k, values.shape[0], "k"))


def score_function_surrogate(logps: torch.Tensor, coef: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward value ``value``, gradient ``coef * ∇ℓ`` (coef and value treated as constants)."""
    return value.detach() + coef.detach() * (logps - logps.detach())


def _reverse_kl(logps, rewards, ref_logps, *, beta, gamma, k, old_logps, clip_eps):
    kl = (logps - ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    shaped = rewards.to(logps.dtype) - beta * kl - gamma * logps
    adv = (shaped - _leave_one_out(shaped, k)).detach()
    if old_logps is None:
        return -adv * logps
    ratio = torch.exp(logps - old_logps.detach().to(logps.dtype))
    return -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)


def _clip_eps(value: object) -> float:
    return V.check_range(value, "clip_eps", 0.0, 1.0, lo_open=True, hi_open=True)


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

    ``ref_logps=None`` drops the KL term (``β`` must then be 0).  All tensors are ``(B,)``.
    """
    beta = _nonneg(beta, "beta")
    gamma = _nonneg(gamma, "gamma")
    clip_eps = _clip_eps(clip_eps)
    _vector(logps, "logps")
    k = _k_divides(num_samples_per_prompt, logps.shape[0])
    _vector(rewards, "rewards", like=logps, like_name="logps")
    for t, name in ((ref_logps, "ref_logps"), (old_logps, "old_logps")):
        if t is not None:
            _vector(t, name, like=logps, like_name="logps")
    if ref_logps is None and beta > 0:
        raise ValueError("ref_logps: beta > 0 needs reference log-probs")
    return _reverse_kl(logps, rewards, ref_logps, beta=beta, gamma=gamma, k=k, old_logps=old_logps,
                       clip_eps=clip_eps)


def _sampled_kl(logps, ref_logps, k):
    kl = logps - ref_logps.detach().to(logps.dtype)
    return score_function_surrogate(logps, kl - _leave_one_out(kl.detach(), k), kl)


def sampled_kl(logps: torch.Tensor, ref_logps: torch.Tensor, *, num_samples_per_prompt: int = 1) -> torch.Tensor:
    """Score-function estimate of ``KL(π || π₀)`` on samples ``y ~ π``: value ``ℓ - ℓ₀``, gradient
    ``(ℓ - ℓ₀ - b) ∇ℓ`` with the leave-one-out baseline ``b`` over each prompt's samples.  ``(B,)``."""
    _vector(logps, "logps")
    _vector(ref_logps, "ref_logps", like=logps, like_name="logps")
    return _sampled_kl(logps, ref_logps, _k_divides(num_samples_per_prompt, logps.shape[0]))


# ----------------------------------------------------------------------------- SimPO, CPO, ORPO


class _SimPOOptions(NamedTuple):
    beta: float
    gamma_margin: float
    label_smoothing: float
    nll_weight: float
    nll_average: str


def _simpo_options(*, beta, gamma_margin, label_smoothing, nll_weight, nll_average) -> _SimPOOptions:
    return _SimPOOptions(V.check_positive(beta, "beta"), V.check_finite(gamma_margin, "gamma_margin"),
                        _smoothing(label_smoothing), _nonneg(nll_weight, "nll_weight"), _nll_average(nll_average))


def _simpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, o: _SimPOOptions, nll_logps=None):
    x = o.beta * (_per_token(chosen_logps, chosen_lengths) - _per_token(rejected_logps, rejected_lengths))
    losses = _smoothed(x - o.gamma_margin, o.label_smoothing)
    if o.nll_weight:
        src = chosen_logps if nll_logps is None else nll_logps
        losses = losses + o.nll_weight * _nll_term(src, chosen_lengths, o.nll_average)
    return losses


def simpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta=2.0, gamma_margin=1.0,
          label_smoothing=0.0, nll_weight=0.0, nll_average="token") -> torch.Tensor:
    """SimPO (Meng et al. 2024): ``-log σ(β(ℓ_w/n_w - ℓ_l/n_l) - γ_margin)`` (label smoothing as cDPO),
    plus ``nll_weight ·`` the chosen NLL (``nll_average``: ``"token"`` the mean over every chosen token of
    the batch, as TRL and Liger-Kernel; ``"sequence"`` each response's own mean)."""
    o = _simpo_options(beta=beta, gamma_margin=gamma_margin, label_smoothing=label_smoothing, nll_weight=nll_weight,
                       nll_average=nll_average)
    _pair_vectors(chosen_logps, rejected_logps, None, None, chosen_lengths, rejected_lengths)
    return _simpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, o)


class _CPOOptions(NamedTuple):
    beta: float
    loss_type: str
    label_smoothing: float
    simpo_gamma: float
    alphapo_alpha: float
    cpo_alpha: float
    nll_average: str


def _cpo_options(*, beta, loss_type, label_smoothing, simpo_gamma, alphapo_alpha, cpo_alpha,
                 nll_average) -> _CPOOptions:
    beta = V.check_positive(beta, "beta")
    V.check_choice(loss_type, "loss_type", CPO_LOSS_TYPES)
    eps = _smoothing(label_smoothing)
    gamma = V.check_finite(simpo_gamma, "simpo_gamma")
    a = V.check_finite(alphapo_alpha, "alphapo_alpha")
    if cpo_alpha is None:  # TRL: loss_type="alphapo" is SimPO with AlphaPO rewards and no NLL term
        cpo_alpha = 0.0 if loss_type == "alphapo" else 1.0
    cpo_alpha = _nonneg(cpo_alpha, "cpo_alpha")
    return _CPOOptions(beta, "simpo" if loss_type == "alphapo" else loss_type, eps, gamma, a, cpo_alpha,
                      _nll_average(nll_average))


def _cpo_rewards(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, o: _CPOOptions):
    """The per-response rewards ``r`` whose difference CPO scores (before β)."""
    if o.loss_type in ("ipo", "simpo"):
        chosen_logps, rejected_logps = (_per_token(chosen_logps, chosen_lengths),
                                        _per_token(rejected_logps, rejected_lengths))
    if o.alphapo_alpha == 0.0:
        return chosen_logps, rejected_logps
    a = o.alphapo_alpha  # AlphaPO: r = (1 - p^{-α}) / α with p = e^ℓ
    return -torch.expm1(-a * chosen_logps) / a, -torch.expm1(-a * rejected_logps) / a


def _cpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, o: _CPOOptions, nll_logps=None):
    rw, rl = _cpo_rewards(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, o)
    d = rw - rl
    if o.loss_type == "sigmoid":
        losses = _smoothed(o.beta * d, o.label_smoothing)
    elif o.loss_type == "simpo":
        losses = _smoothed(o.beta * d - o.simpo_gamma, o.label_smoothing)
    elif o.loss_type == "hinge":
        losses = torch.relu(1.0 - o.beta * d)
    else:  # ipo
        losses = (d - 0.5 / o.beta) ** 2
    if o.cpo_alpha:
        src = chosen_logps if nll_logps is None else nll_logps
        losses = losses + o.cpo_alpha * _nll_term(src, chosen_lengths, o.nll_average)
    return losses


def cpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths=None, *, beta=0.1, loss_type="sigmoid",
        label_smoothing=0.0, simpo_gamma=0.5, alphapo_alpha=0.0, cpo_alpha=None,
        nll_average="token") -> torch.Tensor:
    """CPO (Xu et al. 2024) as TRL 1.16's ``CPOTrainer``: a preference term on rewards ``r`` plus
    ``cpo_alpha ·`` the chosen NLL::

        sigmoid   -(1-ε) log σ(β(r_w - r_l)) - ε log σ(-β(r_w - r_l))       r = ℓ
        hinge     relu(1 - β(r_w - r_l))                                    r = ℓ
        ipo       (r_w - r_l - 1/(2β))²                                     r = ℓ/n
        simpo     the sigmoid form on β(r_w - r_l) - simpo_gamma             r = ℓ/n
        alphapo   simpo with AlphaPO rewards, cpo_alpha defaulting to 0

    ``alphapo_alpha ≠ 0`` (TRL's ``alpha``) turns any reward into AlphaPO's ``(1 - e^{-α r}) / α``.
    ``cpo_alpha`` defaults to 1 (0 for alphapo).  ``nll_average="token"`` (TRL, Liger-Kernel): the
    NLL is the mean over every chosen token of the batch, repeated per pair; ``"sequence"``: each
    response's ``-ℓ_w / n_w``.  ``rejected_lengths`` is needed by ipo, simpo and alphapo.
    """
    o = _cpo_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                     alphapo_alpha=alphapo_alpha, cpo_alpha=cpo_alpha, nll_average=nll_average)
    _pair_vectors(chosen_logps, rejected_logps, None, None, chosen_lengths, rejected_lengths)
    if chosen_lengths is None:
        raise ValueError("chosen_lengths: CPO needs the chosen token counts (for its NLL term)")
    if o.loss_type in ("ipo", "simpo") and rejected_lengths is None:
        raise ValueError(f"rejected_lengths: loss_type={loss_type!r} averages over tokens and needs rejected_lengths")
    return _cpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, o)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x < 0``, accurate on both sides of ``-log 2`` (Mächler 2012).  Each branch
    only sees the inputs it serves, so the other's infinities never reach the gradient."""
    near = x > -math.log(2.0)
    safe = torch.full_like(x, -1.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, safe))),
                       torch.log1p(-torch.exp(torch.where(near, safe, x))))


def _orpo_odds_term(mw: torch.Tensor, ml: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``-log σ(log odds_w - log odds_l)`` per pair; 0 for a pair with an empty response.

    A mean log-prob of exactly 0 (every token certain, or a one-word vocabulary) has infinite odds:
    it is evaluated at ``-δ`` (``δ = sqrt(tiny)``) with an identity gradient, which gives the limit's
    value and finite gradients instead of ``inf - inf``.
    """
    delta = torch.finfo(mw.dtype).tiny ** 0.5
    safe = lambda m: torch.where(valid, m - (m + delta).clamp(min=0).detach(), torch.full_like(m, -1.0))
    mw, ml = safe(mw), safe(ml)
    log_odds = (mw - _log1mexp(mw)) - (ml - _log1mexp(ml))
    return torch.where(valid, -_logsig(log_odds), torch.zeros_like(log_odds))


def _orpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta, nll_average,
          nll_logps=None, nll_lengths=None):
    valid = (chosen_lengths > 0) & (rejected_lengths > 0)
    odds = _orpo_odds_term(_per_token(chosen_logps, chosen_lengths), _per_token(rejected_logps, rejected_lengths),
                           valid)
    nll = _nll_term(chosen_logps if nll_logps is None else nll_logps,
                    chosen_lengths if nll_lengths is None else nll_lengths, nll_average)
    return nll + beta * odds, odds


def orpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta=0.1,
         nll_average="token") -> torch.Tensor:
    """ORPO (Hong et al. 2024): ``NLL_w - λ log σ(log odds_w - log odds_l)``, ``λ = beta``,
    ``odds = p/(1-p)`` with ``p = exp(ℓ/n)`` (per-token mean log-prob).

    ``nll_average="token"`` (TRL 1.16, Liger-Kernel): the NLL is the mean over every chosen token of
    the batch, repeated per pair; ``"sequence"``: each response's ``-ℓ_w / n_w``.  A pair with an
    empty response (``n = 0``) contributes no odds-ratio term; a response whose mean log-prob is
    exactly 0 (infinite odds) gives the limit value with finite gradients.
    """
    beta = V.check_positive(beta, "beta")
    average = _nll_average(nll_average)
    _pair_vectors(chosen_logps, rejected_logps, None, None, chosen_lengths, rejected_lengths)
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("chosen_lengths: ORPO needs chosen_lengths and rejected_lengths")
    return _orpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=beta, nll_average=average)[0]


# ----------------------------------------------------------------------------- KTO, NPO


class _KTOOptions(NamedTuple):
    beta: float
    loss_type: str
    desirable_weight: float
    undesirable_weight: float
    batch_kl: bool


def _kto_options(*, beta, loss_type, desirable_weight, undesirable_weight, batch_kl) -> _KTOOptions:
    beta = V.check_positive(beta, "beta")
    V.check_choice(loss_type, "loss_type", KTO_LOSS_TYPES)
    lam_d = _nonneg(desirable_weight, "desirable_weight")
    lam_u = _nonneg(undesirable_weight, "undesirable_weight")
    if not isinstance(batch_kl, bool):
        raise TypeError(f"batch_kl: expected a bool, got {type(batch_kl).__name__}")
    if batch_kl and loss_type != "kto":
        raise ValueError(f"batch_kl: loss_type={loss_type!r} has no reference point")
    return _KTOOptions(beta, loss_type, lam_d, lam_u, batch_kl)


def _kto_reference_point(rho, kl_logps, ref_kl_logps, o: _KTOOptions) -> torch.Tensor:
    if o.loss_type != "kto":
        return rho.new_zeros(())
    if kl_logps is not None:
        src = kl_logps.to(rho.dtype) - ref_kl_logps.to(rho.dtype)
    elif o.batch_kl:
        src = rho
    else:
        return rho.new_zeros(())
    return _mean0(src.detach()).clamp(min=0)


def _kto(logps, ref_logps, desirable, o: _KTOOptions, kl_logps=None, ref_kl_logps=None):
    rho = logps - ref_logps.to(logps.dtype)
    z0 = _kto_reference_point(rho, kl_logps, ref_kl_logps, o)
    if o.loss_type == "kto":
        good, bad = 1.0 - torch.sigmoid(o.beta * (rho - z0)), 1.0 - torch.sigmoid(o.beta * (z0 - rho))
    else:  # apo_zero_unpaired
        good, bad = 1.0 - torch.sigmoid(o.beta * rho), torch.sigmoid(o.beta * rho)
    return torch.where(desirable.to(torch.bool), o.desirable_weight * good, o.undesirable_weight * bad), z0


def _check_kto_kl(kl_logps, ref_kl_logps, like, o: _KTOOptions) -> None:
    if (kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("ref_kl_logps: kl_logps and ref_kl_logps must be given together")
    if kl_logps is None:
        return
    if o.loss_type != "kto":
        raise ValueError(f"kl_logps: loss_type={o.loss_type!r} uses no KL completions")
    if o.batch_kl:
        raise ValueError("batch_kl: give KL completions (kl_logps) or batch_kl=True, not both")
    _vector(kl_logps, "kl_logps", like=like, like_name="logps", any_length=True)
    _vector(ref_kl_logps, "ref_kl_logps", like=kl_logps, like_name="kl_logps")


def kto(logps, ref_logps, desirable, *, beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
        kl_logps=None, ref_kl_logps=None, batch_kl=False) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024) as TRL 1.16's ``KTOTrainer``, unpaired: ``ρ = ℓ - ℓ₀``, each
    sequence ``desirable`` (bool ``(B,)``) or not, reference point ``z₀`` (detached)::

        kto                desirable: λ_D (1 - σ(β(ρ - z₀)))   undesirable: λ_U (1 - σ(β(z₀ - ρ)))
        apo_zero_unpaired  desirable: λ_D (1 - σ(βρ))          undesirable: λ_U σ(βρ)

    ``z₀ = clamp(mean(ℓ_KL - ℓ₀_KL), min=0)`` from KL completions (``kl_logps``, ``ref_kl_logps``:
    mismatched prompt/completion pairs, any number); without them ``z₀ = 0`` as TRL and Liger-Kernel,
    or, with ``batch_kl=True``, the clamped mean of the batch's own ``ρ`` (fastpref ≤ 0.1's default).
    """
    o = _kto_options(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                     undesirable_weight=undesirable_weight, batch_kl=batch_kl)
    _vector(logps, "logps")
    _vector(ref_logps, "ref_logps", like=logps, like_name="logps")
    _vector(desirable, "desirable", like=logps, like_name="logps", kind="flag")
    _check_kto_kl(kl_logps, ref_kl_logps, logps, o)
    return _kto(logps, ref_logps, desirable, o, kl_logps, ref_kl_logps)[0]


def _npo(logps, ref_logps, beta):
    return -(2.0 / beta) * _logsig(-beta * (logps - ref_logps.to(logps.dtype)))


def npo(logps, ref_logps, *, beta=0.1) -> torch.Tensor:
    """NPO (Zhang et al. 2024), unlearning: ``-(2/β) log σ(-β(ℓ - ℓ₀))``."""
    beta = V.check_positive(beta, "beta")
    _vector(logps, "logps")
    _vector(ref_logps, "ref_logps", like=logps, like_name="logps")
    return _npo(logps, ref_logps, beta)
