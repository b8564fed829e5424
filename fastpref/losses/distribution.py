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
from ._common import (
    check_common,
    check_logps_vector,
    check_reference_head,
    check_sequences,
    one_reference,
    pair_metrics,
    reduce,
    reference_logps,
    sequence_logps,
    token_exact_kl,
)

KL_ESTIMATORS = ("sampled", "token_exact")


def _check_kl_inputs(estimator, *, ref_logps, have_head, needed: bool, estimator_name="kl_estimator"):
    """The reference each KL estimator needs, checked whether or not β makes it count."""
    V.check_choice(estimator, estimator_name, KL_ESTIMATORS)
    one_reference(ref_logps=ref_logps, have_head=have_head)
    if estimator == "token_exact" and ref_logps is not None:
        raise ValueError("ref_logps: the token_exact estimator needs ref_hidden/ref_weight, not ref_logps")
    if not needed:
        return
    if estimator == "token_exact" and not have_head:
        raise ValueError("ref_hidden: the token_exact KL estimator needs ref_hidden and ref_weight")
    if estimator == "sampled" and not (have_head or ref_logps is not None):
        raise ValueError("ref_logps: beta > 0 needs the reference (ref_logps or ref_hidden/ref_weight)")


def _kl_per_sequence(estimator, pol, hidden, weight, labels, bias, opts, *, ref_logps, have_head, ref_hidden,
                     ref_weight, ref_bias, k):
    """KL(π‖π₀) per sequence on samples ``y ~ π``: score-function surrogate (value ``ℓ - ℓ₀``), or the
    exact token-level reverse KL along the path ``κ(y) = Σ_t KL(π(·|y<t) ‖ π₀(·|y<t))``.

    ``KL(π‖π₀) = E_y[κ(y)]`` and ``κ`` depends on θ both directly and through the sampled path, so its
    gradient is ``E[∇κ] + E[(κ - b) ∇ℓ]``: the surrogate has value ``κ`` and both terms (``b`` the
    leave-one-out baseline over each prompt's samples)."""
    if estimator == "token_exact":
        kl = token_exact_kl(hidden, weight, labels, bias, opts, ref_hidden=ref_hidden, ref_weight=ref_weight,
                            ref_bias=ref_bias)
        coef = kl.detach() - objectives._leave_one_out(kl.detach(), k)
        return kl + coef * (pol.logps - pol.logps.detach())
    ref = reference_logps(labels, opts, have_head=have_head, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, precomputed=ref_logps)
    return objectives._sampled_kl(pol.logps, ref, k)


def _paired(hidden, weight, labels, bias, *, gamma, beta, kl_estimator, ref_logps, ref_hidden, ref_weight, ref_bias,
            opts):
    """Shared set-up of the two paired objectives: checks, then the policy's log-probs."""
    labels = check_sequences(hidden, weight, labels, bias, opts, paired=True)
    gamma = V.check_positive(gamma, "gamma")
    beta = V.check_range(beta, "beta", 0.0, float("inf"), lo_open=False, hi_open=True)
    have_head = check_reference_head(ref_hidden, ref_weight, ref_bias, hidden, weight)
    check_logps_vector(ref_logps, "ref_logps", hidden.shape[0], hidden)
    _check_kl_inputs(kl_estimator, ref_logps=ref_logps, have_head=have_head, needed=beta > 0)
    return labels, gamma, beta, have_head


def _regularise(data_losses, pol, hidden, weight, labels, bias, opts, *, beta, kl_estimator, ref_logps, have_head,
                ref_hidden, ref_weight, ref_bias):
    if beta == 0.0:
        return data_losses, None
    kl = _kl_per_sequence(kl_estimator, pol, hidden, weight, labels, bias, opts, ref_logps=ref_logps,
                          have_head=have_head, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, k=1)
    half = kl.shape[0] // 2
    return data_losses + beta * 0.5 * (kl[:half] + kl[half:]), kl  # both responses are samples of the prompt


def _finish(losses, data, kl, pol, gamma, reduction, return_metrics):
    loss = reduce(losses, reduction)
    if not return_metrics:
        return loss
    return loss, pair_metrics(pol.logps, gamma * pol.logps, data,
                              kl=None if kl is None else objectives._mean0(kl.detach()))


def pmle_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    gamma: float,
    beta: float = 0.0,
    kl_estimator: str = "token_exact",
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
            unbiased when the responses are samples of the policy).  Checked even when ``beta = 0``.
        ref_logps: ``(2P,)`` precomputed reference log-probs (``sampled`` only).
        return_metrics: also return the metrics dict of :mod:`fastpref.losses._common` (rewards ``γ ℓ``).

    In plain PyTorch::

        logps = (token_logps * mask).sum(-1)
        loss = -F.logsigmoid(gamma * (logps[:P] - logps[P:])).mean()
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction, return_metrics=return_metrics)
    ref = dict(ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    labels, gamma, beta, have_head = _paired(hidden, weight, labels, bias, gamma=gamma, beta=beta,
                                             kl_estimator=kl_estimator, opts=opts, **ref)
    pol = sequence_logps(hidden, weight, labels, bias, opts)
    half = hidden.shape[0] // 2
    data = objectives._pmle(pol.logps[:half], pol.logps[half:], gamma)
    losses, kl = _regularise(data, pol, hidden, weight, labels, bias, opts, beta=beta, kl_estimator=kl_estimator,
                             have_head=have_head, **ref)
    return _finish(losses, data, kl, pol, gamma, reduction, return_metrics)


def preference_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    reward_a: Optional[torch.Tensor] = None,
    reward_b: Optional[torch.Tensor] = None,
    target_prob: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    gamma: float,
    beta: float = 0.0,
    kl_estimator: str = "sampled",
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
    default KL estimator is ``"sampled"``.  Paper setting: γ = 0.1, β = 0.05.  Metrics: the schema of
    :mod:`fastpref.losses._common` (rewards ``γ ℓ``).

    In plain PyTorch::

        x = gamma * (logps[:P] - logps[P:])
        loss = F.binary_cross_entropy_with_logits(x, torch.sigmoid(reward_a - reward_b))
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction, return_metrics=return_metrics)
    ref = dict(ref_logps=ref_logps, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    labels, gamma, beta, have_head = _paired(hidden, weight, labels, bias, gamma=gamma, beta=beta,
                                             kl_estimator=kl_estimator, opts=opts, **ref)
    half = hidden.shape[0] // 2
    objectives._preference_targets(half, hidden, reward_a, reward_b, target_prob, like_name="hidden")
    pol = sequence_logps(hidden, weight, labels, bias, opts)
    data = objectives._preference_distillation(pol.logps[:half], pol.logps[half:], gamma, reward_a, reward_b,
                                               target_prob)
    losses, kl = _regularise(data, pol, hidden, weight, labels, bias, opts, beta=beta, kl_estimator=kl_estimator,
                             have_head=have_head, **ref)
    return _finish(losses, data, kl, pol, gamma, reduction, return_metrics)


def reverse_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    rewards: torch.Tensor,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    beta: float,
    gamma: float,
    num_samples_per_prompt: int,
    entropy: str = "sequence",
    kl_estimator: str = "sampled",
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
            samples of each prompt on consecutive rows.
        rewards: ``(B,)`` reward-model scores ``R̂`` (keyword-only, like every per-batch tensor).
        old_logps: ``(B,)`` behaviour-policy log-probs: PPO clipping with ``clip_eps``.
        beta: KL strength (paper: 0.05); gamma: entropy strength (paper: 0.01).
        entropy: ``"sequence"`` — the score-function estimate ``-ℓ`` inside the shaped reward; or
            ``"token_exact"`` — ``η(y) = Σ_t H(π(·|y<t))`` over the full vocabulary: ``H(π) = E_y[η(y)]``,
            so ``η`` is both differentiated directly and added to the shaped reward (it depends on the path).
        kl_estimator: ``"sampled"`` (``ℓ - ℓ₀`` in the shaped reward) or ``"token_exact"``
            (``Σ_t KL(π‖π₀)`` via ``linear_divergence``, needs ``ref_hidden``/``ref_weight``).
        return_metrics: also return ``logps``, ``kl``, ``entropy``, ``score`` and ``objective`` (the
            schema of :mod:`fastpref.losses._common`).

    The per-sample surrogate (leave-one-out baseline ``b`` over each prompt's samples)::

        shaped = rewards - beta * (logps - ref_logps) - gamma * logps       # sampled / sequence
        adv = (shaped - leave_one_out(shaped)).detach()
        loss = -(adv * logps).mean()        # token_exact: kl_tok / H_tok join `shaped` (detached) too,
                                            # and + beta * kl_tok - gamma * H_tok are differentiated directly
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction, return_metrics=return_metrics)
    labels = check_sequences(hidden, weight, labels, bias, opts, paired=False)
    b = hidden.shape[0]
    check_logps_vector(rewards, "rewards", b, hidden)
    check_logps_vector(old_logps, "old_logps", b, hidden)
    check_logps_vector(ref_logps, "ref_logps", b, hidden)
    beta = V.check_range(beta, "beta", 0.0, float("inf"), lo_open=False, hi_open=True)
    gamma = V.check_range(gamma, "gamma", 0.0, float("inf"), lo_open=False, hi_open=True)
    k = objectives._k_divides(num_samples_per_prompt, b)
    V.check_choice(entropy, "entropy", ("sequence", "token_exact"))
    clip_eps = objectives._clip_eps(clip_eps)
    have_head = check_reference_head(ref_hidden, ref_weight, ref_bias, hidden, weight)
    _check_kl_inputs(kl_estimator, ref_logps=ref_logps, have_head=have_head, needed=beta > 0)

    pol = sequence_logps(hidden, weight, labels, bias, opts, return_entropy=(entropy == "token_exact"))
    ref = None
    if beta > 0 and kl_estimator == "sampled":
        ref = reference_logps(labels, opts, have_head=have_head, ref_hidden=ref_hidden, ref_weight=ref_weight,
                              ref_bias=ref_bias, precomputed=ref_logps).to(pol.logps.dtype)
    # Exact token-level terms κ(y) (KL, entropy along the sampled path) enter twice: differentiated
    # directly, and as part of the shaped reward of the score-function term (they depend on the path).
    kl_tok = ent_tok = None
    shaped_rewards = rewards.to(pol.logps.dtype)
    if beta > 0 and kl_estimator == "token_exact":
        kl_tok = token_exact_kl(hidden, weight, labels, bias, opts, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                ref_bias=ref_bias)
        shaped_rewards = shaped_rewards - beta * kl_tok.detach()
    if entropy == "token_exact":
        ent_tok = pol.token_entropy.sum(-1)
        shaped_rewards = shaped_rewards + gamma * ent_tok.detach()
    losses = objectives._reverse_kl(pol.logps, shaped_rewards, ref, beta=beta if ref is not None else 0.0,
                                    gamma=gamma if entropy == "sequence" else 0.0, k=k, old_logps=old_logps,
                                    clip_eps=clip_eps)
    if kl_tok is not None:
        losses = losses + beta * kl_tok
    if ent_tok is not None:
        losses = losses - gamma * ent_tok
    loss = reduce(losses, reduction)
    if not return_metrics:
        return loss
    mean0 = objectives._mean0
    kl_est = kl_tok if kl_tok is not None else (pol.logps - ref if ref is not None else None)
    ent_est = (ent_tok if ent_tok is not None else -pol.logps).detach()
    score = rewards.detach().to(pol.logps.dtype)
    metrics = {"logps": pol.logps.detach(), "score": mean0(score), "entropy": mean0(ent_est)}
    objective = score + gamma * ent_est
    if kl_est is not None:
        metrics["kl"] = mean0(kl_est.detach())
        objective = objective - beta * kl_est.detach()
    metrics["objective"] = mean0(objective)
    return loss, metrics


def policy_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    estimator: str = "sampled",
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
    ``estimator="token_exact"``: value ``κ = Σ_t KL(π(·|y<t) ‖ π₀(·|y<t))`` exact over the vocabulary
    along the sampled path (``kind="reverse_kl"`` of :func:`fastpref.linear_divergence`), gradient
    ``∇κ + (κ - b) ∇ℓ`` (the path itself depends on π; one more fused log-prob pass for ``ℓ``).

    Multiply by β and add to any loss.  Returns the reduced estimate (``reduction="none"``: ``(B,)``).
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction)
    labels = check_sequences(hidden, weight, labels, bias, opts, paired=False)
    check_logps_vector(ref_logps, "ref_logps", hidden.shape[0], hidden)
    have_head = check_reference_head(ref_hidden, ref_weight, ref_bias, hidden, weight)
    _check_kl_inputs(estimator, ref_logps=ref_logps, have_head=have_head, needed=True, estimator_name="estimator")
    k = objectives._k_divides(num_samples_per_prompt, hidden.shape[0])
    pol = sequence_logps(hidden, weight, labels, bias, opts)
    kl = _kl_per_sequence(estimator, pol, hidden, weight, labels, bias, opts, ref_logps=ref_logps,
                          have_head=have_head, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, k=k)
    return reduce(kl, reduction)
