"""Every loss against its independent oracle (fastpref.reference.losses), gradients included;
closed forms; module twins; objectives on precomputed log-probs; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_accurate

import fastpref as fp
from fastpref.reference import losses as oracle

P, T, D, V = 3, 7, 16, 97
B = 2 * P


def make_batch(gen, dtype=torch.float64, *, bias=True):
    """Policy and reference heads, (B, T) labels with a 2-token prompt and ragged padding."""
    h = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    w = torch.randn(V, D, generator=gen, dtype=torch.float64) * (2.0 / D**0.5)
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.3 if bias else None
    rh = h + 0.3 * torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    rw = w + 0.05 * torch.randn(V, D, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :2] = -100
    for i, pad in enumerate(torch.randint(0, 3, (B,), generator=gen).tolist()):
        if pad:
            labels[i, T - pad:] = -100
    cast = lambda t: None if t is None else t.to(dtype)
    return dict(hidden=cast(h), weight=cast(w), bias=cast(b), ref_hidden=cast(rh), ref_weight=cast(rw), labels=labels,
                g=torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))))


def _pre(bt):
    """Precomputed reference log-probs (B,), from the oracle."""
    tok, _ = oracle.token_logps(bt["ref_hidden"].double(), bt["ref_weight"].double(), bt["labels"])
    return tok.sum(-1)


def _rewards(bt):
    return torch.randn(B, generator=bt["g"], dtype=torch.float64)


REF = lambda bt: dict(ref_hidden=bt["ref_hidden"], ref_weight=bt["ref_weight"])  # noqa: E731

# id -> (fast function, oracle function, kwargs builder, call style)
CASES = {}
for lt in fp.objectives.DPO_LOSS_TYPES:
    CASES[f"dpo-{lt}"] = (fp.dpo_loss, oracle.dpo, lambda bt, lt=lt: dict(
        loss_type=lt, beta=0.2, label_smoothing=0.01 if lt == "exo_pair" else 0.0, **REF(bt)), "paired")
for lt in ("ipo", "sigmoid_norm", "hinge", "exo_pair", "robust", "discopop", "sft"):
    for fdiv, alpha in (("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)):
        CASES[f"dpo-{lt}-{fdiv}"] = (fp.dpo_loss, oracle.dpo, lambda bt, lt=lt, fdiv=fdiv, alpha=alpha: dict(
            loss_type=lt, f_divergence=fdiv, f_alpha=alpha, label_smoothing=0.1 if lt in ("exo_pair", "robust") else 0.0,
            **REF(bt)), "paired")
CASES.update({
    "dpo-precomputed-ref": (fp.dpo_loss, oracle.dpo, lambda bt: dict(
        ref_chosen_logps=_pre(bt)[:P], ref_rejected_logps=_pre(bt)[P:]), "paired"),
    "dpo-cdpo-eps0.1-temp0.8": (fp.dpo_loss, oracle.dpo, lambda bt: dict(label_smoothing=0.1, temperature=0.8, **REF(bt)), "paired"),
    "dpo-robust-eps0.2": (fp.dpo_loss, oracle.dpo, lambda bt: dict(loss_type="robust", label_smoothing=0.2, **REF(bt)), "paired"),
    "dpo-fdpo-forward_kl": (fp.dpo_loss, oracle.dpo, lambda bt: dict(f_divergence="forward_kl", **REF(bt)), "paired"),
    "dpo-fdpo-js": (fp.dpo_loss, oracle.dpo, lambda bt: dict(f_divergence="js_divergence", **REF(bt)), "paired"),
    "dpo-fdpo-alpha0.3": (fp.dpo_loss, oracle.dpo, lambda bt: dict(f_divergence="alpha_divergence", f_alpha=0.3, **REF(bt)), "paired"),
    "dpo-fdpo-alpha1.7": (fp.dpo_loss, oracle.dpo, lambda bt: dict(f_divergence="alpha_divergence", f_alpha=1.7, **REF(bt)), "paired"),
    "dpo-list-mpo": (fp.dpo_loss, oracle.dpo, lambda bt: dict(loss_type=["sigmoid", "bco_pair", "sft"],
                                                              loss_weights=[0.8, 0.2, 1.0], **REF(bt)), "paired"),
    "dpo-rpo0.5-softcap": (fp.dpo_loss, oracle.dpo, lambda bt: dict(rpo_alpha=0.5, softcap=3.0, **REF(bt)), "paired"),
    "dpo-rpo0.5-ld0.4": (fp.dpo_loss, oracle.dpo, lambda bt: dict(rpo_alpha=0.5, ld_alpha=0.4, **REF(bt)), "paired"),
    "dpo-wpo": (fp.dpo_loss, oracle.dpo, lambda bt: dict(use_weighting=True, temperature=1.3, **REF(bt)), "paired"),
    "dpo-wpo-softcap": (fp.dpo_loss, oracle.dpo, lambda bt: dict(use_weighting=True, temperature=0.9, softcap=3.0, **REF(bt)), "paired"),
    "dpo-wpo-max1-rpo": (fp.dpo_loss, oracle.dpo, lambda bt: dict(use_weighting=True, wpo_max=1.0, rpo_alpha=0.3, **REF(bt)), "paired"),
    "dpo-ld0.4": (fp.dpo_loss, oracle.dpo, lambda bt: dict(ld_alpha=0.4, **REF(bt)), "paired"),
    "dpo-reference-free": (fp.dpo_loss, oracle.dpo, lambda bt: dict(reference_free=True), "paired"),
    "pmle": (fp.pmle_loss, oracle.pmle, lambda bt: dict(gamma=0.5), "paired"),
    "pmle-kl-token-exact": (fp.pmle_loss, oracle.pmle, lambda bt: dict(gamma=0.5, beta=0.1, **REF(bt)), "paired"),
    "pmle-kl-sampled-precomputed": (fp.pmle_loss, oracle.pmle, lambda bt: dict(
        gamma=0.01, beta=0.3, kl_estimator="sampled", ref_logps=_pre(bt)), "paired"),
    "pref-distill-rewards": (fp.preference_distillation_loss, oracle.preference_distillation, lambda bt: dict(
        gamma=0.1, reward_a=torch.randn(P, generator=bt["g"], dtype=torch.float64),
        reward_b=torch.randn(P, generator=bt["g"], dtype=torch.float64)), "paired"),
    "pref-distill-target-kl-sampled": (fp.preference_distillation_loss, oracle.preference_distillation, lambda bt: dict(
        gamma=0.1, target_prob=torch.rand(P, generator=bt["g"], dtype=torch.float64), beta=0.05, **REF(bt)), "paired"),
    "rkl-k2-sampled": (fp.reverse_kl_loss, oracle.reverse_kl, lambda bt: dict(
        rewards=_rewards(bt), beta=0.05, gamma=0.01, num_samples_per_prompt=2, ref_logps=_pre(bt)), "paired"),
    "rkl-k3-token-exact": (fp.reverse_kl_loss, oracle.reverse_kl, lambda bt: dict(
        rewards=_rewards(bt), beta=0.05, gamma=0.01, num_samples_per_prompt=3, entropy="token_exact",
        kl_estimator="token_exact", **REF(bt)), "paired"),
    "rkl-k3-ppo-clip": (fp.reverse_kl_loss, oracle.reverse_kl, lambda bt: dict(
        rewards=_rewards(bt), beta=0.1, gamma=0.02, num_samples_per_prompt=3, **REF(bt),
        old_logps=_pre(bt) + 0.3 * torch.randn(B, generator=bt["g"], dtype=torch.float64), clip_eps=0.2), "paired"),
    "policy-kl-sampled-k2": (fp.policy_kl_loss, oracle.policy_kl, lambda bt: dict(
        estimator="sampled", num_samples_per_prompt=2, **REF(bt)), "paired"),
    "policy-kl-token-exact": (fp.policy_kl_loss, oracle.policy_kl, lambda bt: dict(estimator="token_exact", **REF(bt)),
                              "paired"),
    "simpo": (fp.simpo_loss, oracle.simpo, lambda bt: dict(beta=2.0, gamma_margin=0.5), "paired"),
    "simpo-ls0.1": (fp.simpo_loss, oracle.simpo, lambda bt: dict(label_smoothing=0.1), "paired"),
    "simpo-nll0.7": (fp.simpo_loss, oracle.simpo, lambda bt: dict(nll_weight=0.7), "paired"),
    "simpo-nll0.7-sequence": (fp.simpo_loss, oracle.simpo, lambda bt: dict(nll_weight=0.7, nll_average="sequence"), "paired"),
    "cpo": (fp.cpo_loss, oracle.cpo, lambda bt: dict(beta=0.2, cpo_alpha=0.7), "paired"),
    "cpo-sequence-nll": (fp.cpo_loss, oracle.cpo, lambda bt: dict(beta=0.2, cpo_alpha=0.7, nll_average="sequence"), "paired"),
    "cpo-hinge-ls": (fp.cpo_loss, oracle.cpo, lambda bt: dict(loss_type="hinge", beta=0.05), "paired"),
    "cpo-ipo": (fp.cpo_loss, oracle.cpo, lambda bt: dict(loss_type="ipo", beta=0.5), "paired"),
    "cpo-simpo": (fp.cpo_loss, oracle.cpo, lambda bt: dict(loss_type="simpo", beta=2.0, simpo_gamma=0.7,
                                                          label_smoothing=0.1), "paired"),
    "cpo-alphapo": (fp.cpo_loss, oracle.cpo, lambda bt: dict(loss_type="alphapo", beta=2.0, alphapo_alpha=0.25), "paired"),
    "cpo-sigmoid-alphapo-nll": (fp.cpo_loss, oracle.cpo, lambda bt: dict(beta=0.1, alphapo_alpha=-0.01), "paired"),
    "orpo": (fp.orpo_loss, oracle.orpo, lambda bt: dict(beta=0.3), "paired"),
    "orpo-sequence": (fp.orpo_loss, oracle.orpo, lambda bt: dict(beta=0.3, nll_average="sequence"), "paired"),
    "orpo-nll-labels": (fp.orpo_loss, oracle.orpo, lambda bt: dict(beta=0.3, nll_labels=_with_prompt(bt)), "paired"),
    "kto-no-kl": (fp.kto_loss, oracle.kto, lambda bt: dict(
        desirable=torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), desirable_weight=1.3, **REF(bt)), "paired"),
    "kto-batch-kl": (fp.kto_loss, oracle.kto, lambda bt: dict(
        desirable=torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), batch_kl=True, beta=0.5, **REF(bt)), "paired"),
    "kto-kl-logps": (fp.kto_loss, oracle.kto, lambda bt: dict(
        desirable=torch.tensor([0, 0, 1, 1, 0, 1], dtype=torch.bool), ref_logps=_pre(bt),
        kl_logps=_pre(bt)[:4] + 2.0, ref_kl_logps=_pre(bt)[:4]), "paired"),
    "kto-apo-zero-unpaired": (fp.kto_loss, oracle.kto, lambda bt: dict(
        desirable=torch.tensor([1, 1, 0, 1, 0, 0]), loss_type="apo_zero_unpaired", undesirable_weight=0.6, **REF(bt)),
        "paired"),
    "npo": (fp.npo_loss, oracle.npo, lambda bt: dict(beta=0.5, **REF(bt)), "paired"),
    "nll": (fp.nll_loss, oracle.nll, lambda bt: dict(temperature=0.9), "paired"),
})
for kind in ("forward_kl", "reverse_kl", "jsd"):
    CASES[f"distill-{kind}"] = (fp.distill_loss, oracle.distill, lambda bt, k=kind: dict(kind=k, beta=0.3, temperature=1.5), "distill")
CASES["distill-jsd-hard0.5"] = (fp.distill_loss, oracle.distill, lambda bt: dict(kind="jsd", hard_weight=0.5, soft_weight=0.7), "distill")
CASES["distill-no-labels-softcap"] = (fp.distill_loss, oracle.distill, lambda bt: dict(
    kind="reverse_kl", student_softcap=2.0, teacher_softcap=3.0, no_labels=True), "distill")


def _with_prompt(bt):
    """NLL labels of the chosen half that also score the 2-token prompt (TRL's ORPO convention)."""
    y = bt["labels"][:P].clone()
    y[:, :2] = torch.randint(0, V, (P, 2), generator=bt["g"])
    return y


def _call(style, fn, bt, kw, leaves, **extra):
    h, w, b = leaves
    kw = dict(kw)
    if style == "distill":
        labels = None if kw.pop("no_labels", False) else bt["labels"]
        return fn(h, w, kw.pop("teacher_hidden", bt["ref_hidden"]), bt["ref_weight"], labels, student_bias=b,
                  **kw, **extra)
    return fn(h, w, bt["labels"], b, **kw, **extra)


def _run(case, bt, kw, *, fast: bool, cast, precision="fp64"):
    fast_fn, oracle_fn, _, style = CASES[case]
    kw = dict(kw)
    if not fast:
        kw.pop("reference_free", None)  # the oracle's reference-free form is simply "no reference"
    for k in ("ref_hidden", "ref_weight"):
        if k in kw:
            kw[k] = cast(kw[k])
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in (bt["hidden"], bt["weight"], bt["bias"])]
    extra = dict(reduction="none", backend="torch") if fast else dict(precision=precision)
    local = dict(bt, ref_hidden=cast(bt["ref_hidden"]), ref_weight=cast(bt["ref_weight"]))
    out = _call(style, fast_fn if fast else oracle_fn, local, kw, leaves, **extra)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * up).sum(), [t for t in leaves if t is not None])
    return out, grads


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_oracle_fp64(case, gen):
    bt = make_batch(gen)
    kw = CASES[case][2](bt)
    cast = lambda t: t
    got, got_g = _run(case, bt, kw, fast=True, cast=cast)
    want, want_g = _run(case, bt, kw, fast=False, cast=cast)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    print(f"{case}: max |fast - oracle| = {err:.2e} (loss scale {want.abs().max().item():.2e})")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for g, wg in zip(got_g, want_g):  # fp64 agreement, relative to the gradient's own scale
        torch.testing.assert_close(g, wg, rtol=1e-8, atol=1e-10 * max(1.0, wg.abs().max().item()))


RULE_CASES = ["dpo-sigmoid", "dpo-ipo", "pmle-kl-token-exact", "pref-distill-rewards", "rkl-k3-token-exact",
              "simpo", "orpo", "kto-batch-kl", "cpo-alphapo", "dpo-list-mpo", "distill-jsd", "distill-jsd-hard0.5"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", RULE_CASES)
def test_loss_accuracy_rule(case, dtype, gen):
    bt = make_batch(gen, dtype=dtype)
    kw = CASES[case][2](bt)
    truth, truth_g = _run(case, bt, kw, fast=False, cast=lambda t: t.double())
    naive, naive_g = _run(case, bt, kw, fast=False, cast=lambda t: t, precision="native")
    got, got_g = _run(case, bt, kw, fast=True, cast=lambda t: t)
    assert_accurate(f"{case} loss", got, naive, truth, dtype)
    for name, g, ng, tg in zip(("d_hidden", "d_weight", "d_bias"), got_g, naive_g, truth_g):
        assert_accurate(f"{case} {name}", g, ng, tg, dtype)


# ------------------------------------------------------------------ closed forms


def _duplicated_pairs(gen):
    bt = make_batch(gen)
    for k in ("hidden", "ref_hidden", "labels"):
        bt[k] = torch.cat([bt[k][:P], bt[k][:P]])
    return bt


def test_zero_margin_gives_log2(gen):
    bt = _duplicated_pairs(gen)
    dpo = fp.dpo_loss(bt["hidden"], bt["weight"], bt["labels"], bt["bias"], **REF(bt), reduction="none")
    pmle = fp.pmle_loss(bt["hidden"], bt["weight"], bt["labels"], bt["bias"], gamma=0.5, reduction="none")
    torch.testing.assert_close(dpo, torch.full_like(dpo, math.log(2)), rtol=0, atol=1e-12)
    torch.testing.assert_close(pmle, torch.full_like(pmle, math.log(2)), rtol=0, atol=1e-12)


def test_distillation_at_its_target_has_zero_gradient(gen):
    bt = make_batch(gen)
    gamma = 0.1
    with torch.no_grad():
        seq = fp.sequence_logprobs(bt["hidden"], bt["weight"], bt["labels"], bt["bias"])
        target = torch.sigmoid(gamma * (seq[:P] - seq[P:]))
    h, w = bt["hidden"].clone().requires_grad_(), bt["weight"].clone().requires_grad_()
    fp.preference_distillation_loss(h, w, bt["labels"], bt["bias"], gamma=gamma, target_prob=target).backward()
    assert h.grad.abs().max() < 1e-12 and w.grad.abs().max() < 1e-12
    # and away from it the gradient is not zero
    h.grad = None
    fp.preference_distillation_loss(h, w, bt["labels"], bt["bias"], gamma=gamma, target_prob=1 - target).backward()
    assert h.grad.abs().max() > 1e-4


@pytest.mark.parametrize("entropy", ["sequence", "token_exact"])
def test_reverse_kl_optimum_has_zero_expected_gradient(entropy, gen):
    """Tabular case: one context, single-token responses.  The exact expectation over a ~ π of the
    per-sample surrogate gradient vanishes at π ∝ π₀^{β/(β+γ)} exp(R̂/(β+γ)) and nowhere else."""
    n_tok, beta, gamma = 8, 0.5, 0.2  # moderate, so that pi is not one-hot and the test discriminates
    log_pi0 = torch.log_softmax(torch.randn(n_tok, generator=gen, dtype=torch.float64), 0)
    reward = torch.randn(n_tok, generator=gen, dtype=torch.float64)
    optimum = (beta * log_pi0 + reward) / (beta + gamma)
    hidden = torch.ones(n_tok, 1, 1, dtype=torch.float64)  # row y is the sample "y"
    labels = torch.arange(n_tok).view(n_tok, 1)

    def expected_grad(logits):
        w = logits.clone().view(n_tok, 1).requires_grad_()
        per_sample = fp.reverse_kl_loss(hidden, w, labels, rewards=reward, beta=beta, gamma=gamma, num_samples_per_prompt=1,
                                        ref_logps=log_pi0, entropy=entropy, reduction="none")
        pi = torch.softmax(logits, 0).detach()
        (pi * per_sample).sum().backward()
        return w.grad

    assert expected_grad(optimum).abs().max() < 1e-12
    assert expected_grad(optimum + 0.3 * torch.randn(n_tok, generator=gen, dtype=torch.float64)).abs().max() > 1e-4


@pytest.mark.parametrize("entropy,kl_estimator", [("token_exact", "token_exact"), ("sequence", "token_exact"),
                                                   ("token_exact", "sampled")])
def test_reverse_kl_expected_gradient_is_the_objective_gradient(entropy, kl_estimator, gen):
    """Two-token responses over a vocabulary of K, every sequence enumerated: the expectation over
    y ~ π of the per-sample surrogate gradient equals the gradient of the exact objective
    -E[R] - γ H(π) + β KL(π‖π₀).  The exact token-level terms depend on the sampled path, so they must
    enter the score-function term as well as being differentiated directly."""
    K, beta, gamma = 4, 0.3, 0.2
    D = 1 + K  # context 0 = the first step; context 1 + y1 = the second step after y1
    w0 = torch.randn(K, D, generator=gen, dtype=torch.float64)
    w = torch.randn(K, D, generator=gen, dtype=torch.float64).requires_grad_()
    ys = torch.cartesian_prod(torch.arange(K), torch.arange(K))  # (K², 2)
    hidden = torch.zeros(K * K, 2, D, dtype=torch.float64)
    hidden[:, 0, 0] = 1.0
    hidden[torch.arange(K * K), 1, 1 + ys[:, 0]] = 1.0
    reward = torch.randn(K * K, generator=gen, dtype=torch.float64)

    def seq_logp(weight):
        logsm = torch.log_softmax(hidden @ weight.T, -1)  # (K², 2, K)
        return logsm.gather(-1, ys.unsqueeze(-1)).squeeze(-1).sum(-1)

    lp, lp0 = seq_logp(w), seq_logp(w0)
    pi = lp.exp()
    objective = -(pi * reward).sum() + gamma * (pi * lp).sum() + beta * (pi * (lp - lp0)).sum()
    (want,) = torch.autograd.grad(objective, w)

    kl_kw = dict(ref_hidden=hidden, ref_weight=w0) if kl_estimator == "token_exact" else dict(ref_logps=lp0.detach())
    per_sample = fp.reverse_kl_loss(hidden, w, ys, rewards=reward, beta=beta, gamma=gamma, num_samples_per_prompt=1,
                                    entropy=entropy, kl_estimator=kl_estimator, reduction="none", **kl_kw)
    (got,) = torch.autograd.grad((pi.detach() * per_sample).sum(), w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_policy_kl_token_exact_expected_gradient_is_the_kl_gradient(gen):
    """The same enumeration for the regulariser alone: E_y[∇ surrogate] = ∇ KL(π‖π₀) with the
    token-exact estimator (k samples per prompt with a leave-one-out baseline keep it unbiased)."""
    K = 3
    D = 1 + K
    w0 = torch.randn(K, D, generator=gen, dtype=torch.float64)
    w = torch.randn(K, D, generator=gen, dtype=torch.float64).requires_grad_()
    ys = torch.cartesian_prod(torch.arange(K), torch.arange(K))
    hidden = torch.zeros(K * K, 2, D, dtype=torch.float64)
    hidden[:, 0, 0] = 1.0
    hidden[torch.arange(K * K), 1, 1 + ys[:, 0]] = 1.0
    logsm, logsm0 = torch.log_softmax(hidden @ w.T, -1), torch.log_softmax(hidden @ w0.T, -1)
    lp = logsm.gather(-1, ys.unsqueeze(-1)).squeeze(-1).sum(-1)
    lp0 = logsm0.gather(-1, ys.unsqueeze(-1)).squeeze(-1).sum(-1)
    pi = lp.exp()
    (want,) = torch.autograd.grad((pi * (lp - lp0)).sum(), w)
    per_sample = fp.policy_kl_loss(hidden, w, ys, ref_hidden=hidden, ref_weight=w0, estimator="token_exact",
                                   reduction="none")
    (got,) = torch.autograd.grad((pi.detach() * per_sample).sum(), w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((pi * per_sample).sum(), (pi * (lp - lp0)).sum())  # its value is the KL


def test_swapping_chosen_and_rejected_flips_the_margin(gen):
    bt = make_batch(gen)
    swap = lambda t: torch.cat([t[P:], t[:P]])
    _, m1 = fp.dpo_loss(bt["hidden"], bt["weight"], bt["labels"], bt["bias"], **REF(bt), return_metrics=True)
    _, m2 = fp.dpo_loss(swap(bt["hidden"]), bt["weight"], swap(bt["labels"]), bt["bias"],
                        ref_hidden=swap(bt["ref_hidden"]), ref_weight=bt["ref_weight"], return_metrics=True)
    torch.testing.assert_close(m1["reward_margin"], -m2["reward_margin"])
    torch.testing.assert_close(m1["chosen_rewards"], m2["rejected_rewards"])


def test_metrics_are_detached_and_consistent(gen):
    bt = make_batch(gen)
    h = bt["hidden"].clone().requires_grad_()
    loss, m = fp.dpo_loss(h, bt["weight"], bt["labels"], bt["bias"], **REF(bt), beta=0.3, return_metrics=True)
    assert loss.requires_grad and not any(v.requires_grad for v in m.values())
    ref = _pre(bt)
    torch.testing.assert_close(m["chosen_rewards"], 0.3 * (m["chosen_logps"] - ref[:P]))
    acc = (m["chosen_rewards"] > m["rejected_rewards"]).double().mean()
    torch.testing.assert_close(m["reward_accuracy"].double(), acc)


def test_module_twins_match_functions(gen):
    bt = make_batch(gen)
    args = (bt["hidden"], bt["weight"], bt["labels"], bt["bias"])
    torch.testing.assert_close(fp.DPOLoss(beta=0.3, loss_type="ipo")(*args, **REF(bt)),
                               fp.dpo_loss(*args, beta=0.3, loss_type="ipo", **REF(bt)))
    torch.testing.assert_close(fp.PMLELoss(gamma=0.2)(*args), fp.pmle_loss(*args, gamma=0.2))
    with pytest.raises(TypeError, match="betta"):
        fp.DPOLoss(betta=0.1)


def test_objectives_on_precomputed_logps_match_fused(gen):
    bt = make_batch(gen)
    seq = fp.sequence_logprobs(bt["hidden"], bt["weight"], bt["labels"], bt["bias"])
    ref = _pre(bt)
    fused = fp.dpo_loss(bt["hidden"], bt["weight"], bt["labels"], bt["bias"], ref_chosen_logps=ref[:P],
                        ref_rejected_logps=ref[P:], beta=0.2, reduction="none")
    plain = fp.objectives.dpo(seq[:P], seq[P:], ref[:P], ref[P:], beta=0.2)
    torch.testing.assert_close(fused, plain)


def test_all_ignored_sequences_are_finite(gen):
    bt = make_batch(gen)
    labels = torch.full_like(bt["labels"], -100)
    h = bt["hidden"].clone().requires_grad_()
    for loss in (fp.dpo_loss(h, bt["weight"], labels, bt["bias"], **REF(bt)),
                 fp.simpo_loss(h, bt["weight"], labels, bt["bias"]),
                 fp.nll_loss(h, bt["weight"], labels, bt["bias"]),
                 fp.distill_loss(h, bt["weight"], bt["ref_hidden"], bt["ref_weight"], labels)):
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(h.grad).all()
        h.grad = None


# ------------------------------------------------------------------ bad input


def _bad(exc, name, fn, *a, **kw):
    with pytest.raises(exc) as info:
        fn(*a, **kw)
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"


BAD = [
    ("odd-rows", ValueError, "hidden", lambda bt: (fp.dpo_loss, (bt["hidden"][:5], bt["weight"], bt["labels"][:5]),
                                                    dict(reference_free=True))),
    ("hidden-2d", ValueError, "hidden", lambda bt: (fp.pmle_loss, (bt["hidden"][:, 0], bt["weight"], bt["labels"][:, 0]),
                                                     dict(gamma=0.1))),
    ("ref-shape", ValueError, "ref_hidden", lambda bt: (fp.dpo_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                         dict(ref_hidden=bt["ref_hidden"][:, :-1], ref_weight=bt["ref_weight"]))),
    ("ref-vocab", ValueError, "ref_weight", lambda bt: (fp.dpo_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                        dict(ref_hidden=bt["ref_hidden"], ref_weight=bt["ref_weight"][:-1]))),
    ("ref-logps-shape", ValueError, "ref_chosen_logps", lambda bt: (fp.dpo_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                                     dict(ref_chosen_logps=torch.zeros(P + 1, dtype=torch.float64),
                                                                          ref_rejected_logps=torch.zeros(P, dtype=torch.float64)))),
    ("ref-missing", ValueError, "ref_chosen_logps", lambda bt: (fp.dpo_loss, (bt["hidden"], bt["weight"], bt["labels"]), {})),
    ("ref-half", ValueError, "ref_rejected_logps", lambda bt: (fp.dpo_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                                dict(ref_chosen_logps=torch.zeros(P, dtype=torch.float64)))),
    ("beta-zero", ValueError, "beta", lambda bt: (fp.dpo_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                  dict(reference_free=True, beta=0.0))),
    ("beta-nan", ValueError, "beta", lambda bt: (fp.simpo_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                 dict(beta=float("nan")))),
    ("gamma-negative", ValueError, "gamma", lambda bt: (fp.pmle_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                        dict(gamma=-1.0))),
    ("eps-0.5", ValueError, "label_smoothing", lambda bt: (fp.dpo_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                           dict(reference_free=True, label_smoothing=0.5))),
    ("loss-type", ValueError, "loss_type", lambda bt: (fp.dpo_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                       dict(reference_free=True, loss_type="kto"))),
    ("f-divergence", ValueError, "f_divergence", lambda bt: (fp.dpo_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                             dict(reference_free=True, f_divergence="tv"))),
    ("reduction", ValueError, "reduction", lambda bt: (fp.pmle_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                       dict(gamma=0.1, reduction="avg"))),
    ("pd-both-targets", ValueError, "target_prob", lambda bt: (fp.preference_distillation_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                               dict(gamma=0.1, target_prob=torch.rand(P, dtype=torch.float64),
                                                                    reward_a=torch.rand(P, dtype=torch.float64), reward_b=torch.rand(P, dtype=torch.float64)))),
    ("pd-no-target", ValueError, "target_prob", lambda bt: (fp.preference_distillation_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                            dict(gamma=0.1))),
    ("pd-target-shape", ValueError, "target_prob", lambda bt: (fp.preference_distillation_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                               dict(gamma=0.1, target_prob=torch.rand(B, dtype=torch.float64)))),
    ("pmle-kl-no-ref", ValueError, "ref_hidden", lambda bt: (fp.pmle_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                             dict(gamma=0.1, beta=0.1))),
    ("rkl-k", ValueError, "num_samples_per_prompt", lambda bt: (fp.reverse_kl_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                                dict(rewards=torch.zeros(B, dtype=torch.float64), beta=0.0, gamma=0.01, num_samples_per_prompt=4))),
    ("rkl-rewards-shape", ValueError, "rewards", lambda bt: (fp.reverse_kl_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                             dict(rewards=torch.zeros(P, dtype=torch.float64), beta=0.0, gamma=0.01, num_samples_per_prompt=1))),
    ("rkl-no-ref", ValueError, "ref_logps", lambda bt: (fp.reverse_kl_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                        dict(rewards=torch.zeros(B, dtype=torch.float64), beta=0.1, gamma=0.01, num_samples_per_prompt=2))),
    ("kto-desirable-shape", ValueError, "desirable", lambda bt: (fp.kto_loss, (bt["hidden"], bt["weight"], bt["labels"]),
                                                                 dict(desirable=torch.ones(P, dtype=torch.bool), **REF(bt)))),
    ("distill-kind", ValueError, "kind", lambda bt: (fp.distill_loss, (bt["hidden"], bt["weight"], bt["ref_hidden"], bt["ref_weight"], bt["labels"]),
                                                     dict(kind="tv"))),
    ("distill-num-items", ValueError, "num_items_in_batch", lambda bt: (fp.distill_loss, (bt["hidden"], bt["weight"], bt["ref_hidden"], bt["ref_weight"], bt["labels"]),
                                                                        dict(num_items_in_batch=0))),
    ("labels-out-of-range", ValueError, "labels", lambda bt: (fp.simpo_loss, (bt["hidden"], bt["weight"], bt["labels"] + V + 200), {})),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_loss_bad_input(case, gen):
    _, exc, name, build = case
    fn, args, kw = build(make_batch(gen))
    _bad(exc, name, fn, *args, **kw)


# ------------------------------------------------------------------ issue 9: values at the edges, conventions


def test_orpo_certain_chosen_is_the_limit_with_finite_gradient():
    """Mean log-prob exactly 0 (infinite odds): the odds term is its limit 0 and the gradient on ℓ_w is the
    limit of the gradients at ℓ_w -> 0⁻ (checked against ℓ_w = -1e-9)."""
    def grad_at(lw):
        lw = torch.tensor([lw, -3.0], dtype=torch.float64, requires_grad=True)
        out = fp.objectives.orpo(lw, torch.tensor([-2.0, -1.0], dtype=torch.float64), torch.tensor([3, 2]),
                                 torch.tensor([2, 4]), beta=0.5, nll_average="sequence")
        (g,) = torch.autograd.grad(out.sum(), lw)
        return out.detach(), g
    at0, g0 = grad_at(0.0)
    near, g_near = grad_at(-1e-9)
    assert torch.isfinite(g0).all()
    torch.testing.assert_close(at0, near, rtol=0, atol=1e-8)
    torch.testing.assert_close(g0, g_near, rtol=1e-6, atol=0)


def test_orpo_empty_response_has_no_odds_term(gen):
    bt = make_batch(gen)
    labels = bt["labels"].clone()
    labels[P] = -100  # the first pair's rejected response is empty
    loss = fp.orpo_loss(bt["hidden"], bt["weight"], labels, beta=0.3, reduction="none", nll_average="sequence")
    plain = fp.orpo_loss(bt["hidden"], bt["weight"], labels, beta=1e-12, reduction="none", nll_average="sequence")
    torch.testing.assert_close(loss[0], plain[0])  # the NLL alone
    assert (loss[1:] - plain[1:]).abs().min() > 1e-3  # the other pairs keep theirs


def test_discopop_in_float32_below_exp_overflow():
    """β·Δ < -88.7 overflowed e^{-x} in float32 (inf · 0 = NaN); the value is the float64 one."""
    for x in (-100.0, -1e3, -3e4):
        got = fp.objectives.dpo(torch.tensor([x]), torch.tensor([0.0]), beta=1.0, loss_type="discopop")
        want = fp.objectives.dpo(torch.tensor([x], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
                                 beta=1.0, loss_type="discopop")
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_rpo_nll_metric_uses_plain_logps_with_ld_alpha(gen):
    bt = make_batch(gen)
    _, m = fp.dpo_loss(bt["hidden"], bt["weight"], bt["labels"], bt["bias"], **REF(bt), rpo_alpha=0.5, ld_alpha=0.2,
                       return_metrics=True)
    tok, mask = oracle.token_logps(bt["hidden"], bt["weight"], bt["labels"], bt["bias"])
    torch.testing.assert_close(m["nll"], -tok[:P].sum() / mask[:P].sum())


def test_wpo_weights_are_unbounded_by_default(gen):
    """TRL 1.16 no longer clamps the WPO weights at 1; wpo_max=1 restores the clamp."""
    bt = make_batch(gen)
    h = bt["hidden"] * 0.05  # near-uniform policy: log p(y) - log Σp² ≈ 0, so weights ≈ 1 and some exceed 1
    kw = dict(ref_hidden=bt["ref_hidden"], ref_weight=bt["ref_weight"], use_weighting=True, reduction="none")
    plain = fp.dpo_loss(h, bt["weight"], bt["labels"], bt["bias"], ref_hidden=bt["ref_hidden"],
                        ref_weight=bt["ref_weight"], reduction="none")
    w = fp.dpo_loss(h, bt["weight"], bt["labels"], bt["bias"], **kw) / plain
    clamped = fp.dpo_loss(h, bt["weight"], bt["labels"], bt["bias"], wpo_max=1.0, **kw) / plain
    assert (w > 1).any()
    torch.testing.assert_close(clamped, w.clamp(max=1.0))


def test_kto_reference_point_conventions(gen):
    """No KL completions: z₀ = 0 (TRL, Liger); batch_kl=True: the clamped batch mean of ρ."""
    bt = make_batch(gen)
    des = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    _, m0 = fp.kto_loss(bt["hidden"], bt["weight"], bt["labels"], desirable=des, **REF(bt), return_metrics=True)
    _, m1 = fp.kto_loss(bt["hidden"], bt["weight"], bt["labels"], desirable=des, **REF(bt), batch_kl=True,
                        return_metrics=True)
    assert m0["kl"] == 0
    torch.testing.assert_close(m1["kl"], (m1["rewards"] / 0.1).mean().clamp(min=0))


PAIRED_KEYS = {"chosen_logps": (P,), "rejected_logps": (P,), "chosen_rewards": (P,), "rejected_rewards": (P,),
               "reward_margin": (), "reward_accuracy": (), "preference_loss": ()}
SCHEMA = {
    "dpo": (fp.dpo_loss, lambda bt: dict(rpo_alpha=0.3, **REF(bt)), {**PAIRED_KEYS, "nll": ()}),
    "simpo": (fp.simpo_loss, lambda bt: dict(nll_weight=0.3), {**PAIRED_KEYS, "nll": ()}),
    "cpo": (fp.cpo_loss, lambda bt: dict(), {**PAIRED_KEYS, "nll": ()}),
    "orpo": (fp.orpo_loss, lambda bt: dict(), {**PAIRED_KEYS, "nll": ()}),
    "pmle": (fp.pmle_loss, lambda bt: dict(gamma=0.5, beta=0.1, **REF(bt)), {**PAIRED_KEYS, "kl": ()}),
    "pref-distill": (fp.preference_distillation_loss, lambda bt: dict(
        gamma=0.5, target_prob=torch.full((P,), 0.3, dtype=torch.float64)), PAIRED_KEYS),
    "kto": (fp.kto_loss, lambda bt: dict(desirable=torch.arange(B) % 2 == 0, **REF(bt)),
            {"logps": (B,), "rewards": (B,), "reward_margin": (), "kl": ()}),
    "npo": (fp.npo_loss, lambda bt: dict(**REF(bt)), {"logps": (B,), "rewards": (B,)}),
    "rkl": (fp.reverse_kl_loss, lambda bt: dict(rewards=_rewards(bt), beta=0.1, gamma=0.1, num_samples_per_prompt=2,
                                                **REF(bt)),
            {"logps": (B,), "score": (), "entropy": (), "kl": (), "objective": ()}),
}


@pytest.mark.parametrize("name", list(SCHEMA))
def test_metrics_follow_the_one_schema(name, gen):
    """Same keys for the same quantities across losses (the table in fastpref/losses/_common.py), with the
    documented shapes, detached."""
    fn, kw, keys = SCHEMA[name]
    bt = make_batch(gen)
    h = bt["hidden"].clone().requires_grad_()
    _, m = fn(h, bt["weight"], bt["labels"], bt["bias"], return_metrics=True, **kw(bt))
    assert {k: tuple(v.shape) for k, v in m.items()} == keys
    assert not any(v.requires_grad for v in m.values())
    import fastpref.losses._common as common
    for k in m:
        assert f"\n{k} " in common.__doc__, f"{k} is not in the documented schema"
