"""The three distribution-learning objectives of arXiv 2506.01523 ("Alignment as Distribution
Learning: Your Preference Model is Explicitly a Language Model", §4) and the ``β·KL(π‖π₀)``
regulariser they share, on the fused log-prob and divergence primitives.

The paper's preference model: ``a, b ~ μ(x)`` independently and
``P(a ≻ b | x) = σ(γ (log π*(a|x) - log π*(b|x)))``.  The reference model is no part of the
data model; it only enters through the optional regulariser.  No length normalisation.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .. import objectives
from ._common import check_sequences, reduce, reference_logps, sequence_logps, token_exact_kl

KL_ESTIMATORS = ("sampled", "token_exact")


def _kl_per_sequence(estimator, pol, hidden, weight, labels, bias, *, ref_logps, ref_hidden, ref_weight, ref_bias,
                     num_samples_per_prompt, common):
    """β·KL(π‖π₀) per sequence: score-function surrogate on samples (value ``ℓ - ℓ₀``), or the exact
    token-level reverse KL along the path."""
    V.check_choice(estimator, "kl_estimator", KL_ESTIMATORS)
    if estimator == "token_exact":
        if ref_logps is not None:
            raise ValueError("ref_logps: the token_exact estimator needs ref_hidden/ref_weight, not ref_logps")
        return token_exact_kl(hidden, weight, labels, bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                              ref_bias=ref_bias, **common)
    ref = reference_logps(labels, precomputed=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, hidden=hidden, weight=weight, **common)
    if ref is None:
        raise ValueError("ref_logps: beta > 0 needs the reference (ref_logps or ref_hidden/ref_weight)")
    return objectives.sampled_kl(pol.logps, ref.to(pol.logps.dtype), num_samples_per_prompt=num_samples_per_prompt)


def _paired_regularised(data_losses, pol, hidden, weight, labels, bias, *, beta, kl_estimator, ref_logps,
                        ref_hidden, ref_weight, ref_bias, common):
    beta = V.check_range(beta, "beta", 0.0, float("inf"), lo_open=False, hi_open=True)
    if beta == 0.0:
        return data_losses, None
    kl = _kl_per_sequence(kl_estimator, pol, hidden, weight, labels, bias, ref_logps=ref_logps,
                          ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                          num_samples_per_prompt=1, common=common)
    half = kl.shape[0] // 2
    kl_pair = 0.5 * (kl[:half] + kl[half:])  # both responses are samples of the same prompt
    return data_losses + beta * kl_pair, kl_pair


def _metrics(pol, half, data_losses, kl_pair, gamma):
    margin = gamma * (pol.logps[:half] - pol.logps[half:]).detach()
    out = {
        "chosen_logps": pol.logps[:half].detach(),
        "rejected_logps": pol.logps[half:].detach(),
        "margin": margin,
        "preference_accuracy": (margin > 0).float().mean() if half else margin.sum(),
        "data_loss": data_losses.detach().mean() if half else data_losses.detach().sum(),
    }
    if kl_pair is not None:
        out["kl"] = kl_pair.detach()
    return out


def pmle_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    gamma: float,
    beta: float = 0.0,
    kl_estimator: str = "token_exact",
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """Preference maximum-likelihood estimation (arXiv 2506.01523, §4.1, "PMLE").

    ``L = -log σ(γ (ℓ(a⁺) - ℓ(a⁻))) + β KL(π‖π₀)`` — DPO without the reference inside the sigmoid.

    Args:
        hidden: ``(2P, T, D)``, preferred responses first, then dispreferred; labels ``(2P, T)``.
        gamma: the preference model's γ > 0 (paper: TL;DR 1e-2, chat 5e-3).
        beta: regulariser strength (paper: TL;DR 1e-5, chat 0); 0 needs no reference.
        kl_estimator: ``"token_exact"`` (Σ_t KL(π‖π₀) over the vocabulary along each response,
            needs ``ref_hidden``/``ref_weight``) or ``"sampled"`` (score function on ``ℓ - ℓ₀``; only
            unbiased when the responses are samples of the policy).
        ref_logps: ``(2P,)`` precomputed reference log-probs (``sampled`` only).

    In plain PyTorch::

        logps = (token_logps * mask).sum(-1)
        loss = -F.logsigmoid(gamma * (logps[:P] - logps[P:])).mean()
    """
    p2 = check_sequences(hidden, weight, labels, bias, paired=True)
    common = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend)
    pol = sequence_logps(hidden, weight, labels, bias, **common)
    half = p2 // 2
    data = objectives.pmle(pol.logps[:half], pol.logps[half:], gamma=gamma)
    losses, kl_pair = _paired_regularised(
        data, pol, hidden, weight, labels, bias, beta=beta, kl_estimator=kl_estimator, ref_logps=ref_logps,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, common=common,
    )
    loss = reduce(losses, reduction)
    return (loss, _metrics(pol, half, data, kl_pair, gamma)) if return_metrics else loss


def preference_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    gamma: float,
    reward_a: Optional[torch.Tensor] = None,
    reward_b: Optional[torch.Tensor] = None,
    target_prob: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    kl_estimator: str = "sampled",
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """Preference distillation (arXiv 2506.01523, §4.2).

    ``L = BCE_with_logits(γ (ℓ(a₁) - ℓ(a₂)), p) + β KL(π‖π₀)`` with the soft target
    ``p = σ(R̂(a₁) - R̂(a₂))`` from a Bradley-Terry reward model (``reward_a``, ``reward_b``:
    ``(P,)``) or a given ``target_prob`` ``(P,)`` — exactly one of the two.  Symmetric in the
    pair, no label needed; pairs are usually two fresh samples of the current policy, so the
    default KL estimator is ``"sampled"``.  Paper setting: γ = 0.1, β = 0.05.

    In plain PyTorch::

        x = gamma * (logps[:P] - logps[P:])
        loss = F.binary_cross_entropy_with_logits(x, torch.sigmoid(reward_a - reward_b))
    """
    p2 = check_sequences(hidden, weight, labels, bias, paired=True)
    half = p2 // 2
    for t, name in ((reward_a, "reward_a"), (reward_b, "reward_b"), (target_prob, "target_prob")):
        if t is not None:
            V.check_tensor(t, name)
            if tuple(t.shape) != (half,):
                raise ValueError(f"{name}: expected shape ({half},) (one per pair), got {tuple(t.shape)}")
    common = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend)
    pol = sequence_logps(hidden, weight, labels, bias, **common)
    data = objectives.preference_distillation(
        pol.logps[:half], pol.logps[half:], gamma=gamma, reward_a=reward_a, reward_b=reward_b, target_prob=target_prob
    )
    losses, kl_pair = _paired_regularised(
        data, pol, hidden, weight, labels, bias, beta=beta, kl_estimator=kl_estimator, ref_logps=ref_logps,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, common=common,
    )
    loss = reduce(losses, reduction)
    return (loss, _metrics(pol, half, data, kl_pair, gamma)) if return_metrics else loss


def reverse_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    num_samples_per_prompt: int,
    bias: Optional[torch.Tensor] = None,
    entropy: str = "sequence",
    kl_estimator: str = "sampled",
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    old_logps: Optional[torch.Tensor] = None,
    clip_eps: float = 0.2,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
):
    """Reverse-KL minimisation (arXiv 2506.01523, §4.3): RLHF plus an entropy bonus.

    Objective ``-E_{a~π}[R̂(a)] - γ H(π) + β KL(π‖π₀)``; optimum ``π ∝ π₀^{β/(β+γ)} exp(R̂/(β+γ))``.

    Args:
        hidden: ``(B, T, D)`` with ``B = prompts × k``: the ``k = num_samples_per_prompt`` policy
            samples of each prompt on consecutive rows.  rewards: ``(B,)`` reward-model scores ``R̂``.
        beta: KL strength (paper: 0.05); gamma: entropy strength (paper: 0.01).
        entropy: ``"sequence"`` — the score-function estimate ``-ℓ`` inside the shaped reward; or
            ``"token_exact"`` — ``Σ_t H(π(·|y<t))`` over the full vocabulary, differentiated directly.
        kl_estimator: ``"sampled"`` (``ℓ - ℓ₀`` in the shaped reward) or ``"token_exact"``
            (``Σ_t KL(π‖π₀)`` via ``linear_divergence``, needs ``ref_hidden``/``ref_weight``).
        old_logps: ``(B,)`` behaviour-policy log-probs: PPO clipping with ``clip_eps``.

    The per-sample surrogate (leave-one-out baseline ``b`` over each prompt's samples)::

        shaped = rewards - beta * (logps - ref_logps) - gamma * logps       # sampled / sequence
        adv = (shaped - leave_one_out(shaped)).detach()
        loss = -(adv * logps).mean()        # + beta * kl_tok - gamma * H_tok for token_exact terms
    """
    b = check_sequences(hidden, weight, labels, bias, paired=False)
    V.check_tensor(rewards, "rewards")
    if tuple(rewards.shape) != (b,):
        raise ValueError(f"rewards: expected shape ({b},), got {tuple(rewards.shape)}")
    if old_logps is not None:
        V.check_tensor(old_logps, "old_logps")
        if tuple(old_logps.shape) != (b,):
            raise ValueError(f"old_logps: expected shape ({b},), got {tuple(old_logps.shape)}")
    V.check_choice(entropy, "entropy", ("sequence", "token_exact"))
    V.check_choice(kl_estimator, "kl_estimator", KL_ESTIMATORS)
    beta = V.check_range(beta, "beta", 0.0, float("inf"), lo_open=False, hi_open=True)
    gamma = V.check_range(gamma, "gamma", 0.0, float("inf"), lo_open=False, hi_open=True)
    common = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend)
    pol = sequence_logps(hidden, weight, labels, bias, return_entropy=(entropy == "token_exact"), **common)

    ref = None
    if beta > 0 and kl_estimator == "sampled":
        ref = reference_logps(labels, precomputed=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight,
                              ref_bias=ref_bias, hidden=hidden, weight=weight, **common)
        if ref is None:
            raise ValueError("ref_logps: beta > 0 needs the reference (ref_logps or ref_hidden/ref_weight)")
        ref = ref.to(pol.logps.dtype)
    losses = objectives.reverse_kl(
        pol.logps, rewards, ref, beta=beta if ref is not None else 0.0,
        gamma=gamma if entropy == "sequence" else 0.0, num_samples_per_prompt=num_samples_per_prompt,
        old_logps=old_logps, clip_eps=clip_eps,
    )
    kl_tok = ent_tok = None
    if beta > 0 and kl_estimator == "token_exact":
        kl_tok = token_exact_kl(hidden, weight, labels, bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                ref_bias=ref_bias, **common)
        losses = losses + beta * kl_tok
    if entropy == "token_exact":
        ent_tok = pol.token_entropy.sum(-1)
        losses = losses - gamma * ent_tok
    loss = reduce(losses, reduction)
    if not return_metrics:
        return loss
    kl_est = kl_tok if kl_tok is not None else (pol.logps - ref if ref is not None else None)
    ent_est = ent_tok if ent_tok is not None else -pol.logps
    metrics = {
        "logps": pol.logps.detach(),
        "reward": rewards.detach().float().mean(),
        "entropy": ent_est.detach().mean(),
        "objective": (rewards.float() + gamma * ent_est.float()).detach().mean(),
    }
    if kl_est is not None:
        metrics["kl"] = kl_est.detach().mean()
        metrics["objective"] = metrics["objective"] - beta * metrics["kl"]
    return loss, metrics


def policy_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    estimator: str = "sampled",
    bias: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    num_samples_per_prompt: int = 1,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """The ``KL(π‖π₀)`` regulariser of arXiv 2506.01523 on policy samples ``y ~ π`` (per sequence).

    ``estimator="sampled"``: value ``ℓ(y) - ℓ₀(y)``, gradient ``(ℓ - ℓ₀ - b) ∇ℓ`` (score function,
    leave-one-out baseline ``b`` over the ``num_samples_per_prompt`` consecutive samples of a prompt).
    ``estimator="token_exact"``: ``Σ_t KL(π(·|y<t) ‖ π₀(·|y<t))`` exact over the vocabulary along
    the sampled path, via :func:`fastpref.linear_divergence` (``kind="reverse_kl"``).

    Multiply by β and add to any loss.  Returns the reduced estimate (``reduction="none"``: ``(B,)``).
    """
    check_sequences(hidden, weight, labels, bias, paired=False)
    common = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend)
    V.check_choice(estimator, "estimator", KL_ESTIMATORS)
    pol = sequence_logps(hidden, weight, labels, bias, **common) if estimator == "sampled" else None
    kl = _kl_per_sequence(estimator, pol, hidden, weight, labels, bias, ref_logps=ref_logps, ref_hidden=ref_hidden,
                          ref_weight=ref_weight, ref_bias=ref_bias, num_samples_per_prompt=num_samples_per_prompt,
                          common=common)
    return reduce(kl, reduction)
