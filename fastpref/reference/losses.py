"""Oracle versions of every loss (docs/design.md §8), written independently of ``fastpref.objectives`` and
``fastpref.losses``: full logits materialised, formulas spelled out from the papers, explicit
loops where the fast path vectorises.  All return the **unreduced** loss (per pair, per
sequence or per token) in float64 (``precision="fp64"``) or in plain-PyTorch precision
(``precision="native"``).  Gradients come from autograd.
"""

from __future__ import annotations

import math

import torch

from .primitives import materialize_logits

__all__ = [
    "cpo", "distill", "dpo", "kto", "nll", "npo", "orpo", "pmle", "policy_kl", "preference_distillation", "reverse_kl",
    "simpo", "token_logps",
]


def _log_sigmoid(x):
    return -torch.nn.functional.softplus(-x)


def _token_logsm(hidden, weight, bias, temperature, softcap, precision):
    z = materialize_logits(hidden, weight, bias, temperature=temperature, softcap=softcap, precision=precision)
    return torch.log_softmax(z, dim=-1)


def token_logps(hidden, weight, labels, bias=None, *, temperature=1.0, softcap=None, ignore_index=-100,
                precision="fp64"):
    """(B, T) log-probs of the labels (0 where ignored) and the (B, T) mask."""
    logsm = _token_logsm(hidden, weight, bias, temperature, softcap, precision)
    mask = labels != ignore_index
    idx = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)
    return torch.where(mask, logsm.gather(-1, idx).squeeze(-1), torch.zeros((), dtype=logsm.dtype)), mask


def _seq(hidden, weight, labels, bias, kw, ld_alpha=None):
    tok, mask = token_logps(hidden, weight, labels, bias, **kw)
    n = mask.sum(-1).to(tok.dtype)
    if ld_alpha is None:
        return tok.sum(-1), n, tok, mask
    half = hidden.shape[0] // 2
    out = []
    for i in range(hidden.shape[0]):
        j = i + half if i < half else i - half
        public = int(min(mask[i].sum(), mask[j].sum()))
        seen, total = 0, tok.new_zeros(())
        for t in range(labels.shape[1]):
            if mask[i, t]:
                seen += 1
                total = total + (tok[i, t] if seen <= public else ld_alpha * tok[i, t])
        out.append(total)
    return torch.stack(out), n, tok, mask


def _ref_seq(labels, ref_logps, ref_hidden, ref_weight, ref_bias, kw, ld_alpha=None):
    if ref_hidden is not None:
        with torch.no_grad():
            return _seq(ref_hidden, ref_weight, labels, ref_bias, kw, ld_alpha)[0]
    return None if ref_logps is None else ref_logps.to(torch.float64 if kw["precision"] == "fp64" else torch.float32)


def _score(rho, f_divergence, f_alpha):
    """f'(u) at u = e^ρ (f-DPO), with TRL 1.16's constants."""
    u = torch.exp(rho)
    if f_divergence == "reverse_kl":
        return rho
    if f_divergence == "forward_kl":
        return 1 - 1 / u
    if f_divergence == "js_divergence":
        return torch.log(2 * u / (1 + u))
    if abs(f_alpha - 1) < 1e-6:
        return rho
    return (u ** (f_alpha - 1) - 1) / (f_alpha - 1)


def _chosen_token_nll(tok, mask, P):
    """-(mean log-prob over every chosen token of the batch), one value per pair."""
    total, count = tok.new_zeros(()), 0
    for i in range(P):
        for t in range(tok.shape[1]):
            if mask[i, t]:
                total, count = total - tok[i, t], count + 1
    return (total / max(count, 1)).repeat(P)


def dpo(hidden, weight, labels, bias=None, *, ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden=None,
        ref_weight=None, ref_bias=None, beta=0.1, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0,
        f_divergence="reverse_kl", f_alpha=0.5, discopop_tau=0.05, rpo_alpha=None, use_weighting=False,
        wpo_max=None, ld_alpha=None, temperature=1.0, softcap=None, ignore_index=-100, precision="fp64"):
    """Oracle of :func:`fastpref.dpo_loss`: the ``(P,)`` per-pair loss (weighted sum over the loss types, the RPO term,
    WPO weights)."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, n, tok, mask = _seq(hidden, weight, labels, bias, kw, ld_alpha)
    pre = None if ref_chosen_logps is None else torch.cat([ref_chosen_logps, ref_rejected_logps])
    ref = _ref_seq(labels, pre, ref_hidden, ref_weight, ref_bias, kw, ld_alpha)
    ref = torch.zeros_like(pol) if ref is None else ref
    P = pol.shape[0] // 2
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    if rpo_alpha is not None:
        types, weights = types + ["sft"], weights + [rpo_alpha]
    out = torch.zeros_like(pol[:P])
    for lt, lw_ in zip(types, weights):
        out = out + lw_ * _dpo_term(lt, pol, ref, n, tok, mask, P, beta, label_smoothing, f_divergence, f_alpha,
                                    discopop_tau)
    if use_weighting:
        with torch.no_grad():
            logsm = _token_logsm(hidden, weight, bias, temperature, softcap, precision)
            log_sum_p2 = torch.log((logsm.exp() ** 2).sum(-1))
            w_tok = torch.where(mask, tok - log_sum_p2, torch.zeros_like(tok))
            w_seq = torch.exp(w_tok.sum(-1) / n.clamp(min=1))
            weights_ = w_seq[:P] * w_seq[P:]
            if wpo_max is not None:
                weights_ = torch.clamp(weights_, max=wpo_max)
        out = out * weights_
    return out


def _dpo_term(loss_type, pol, ref, n, tok, mask, P, beta, eps, f_divergence, f_alpha, discopop_tau):
    lw, ll, rw, rl = pol[:P], pol[P:], ref[:P], ref[P:]
    rho_w, rho_l = lw - rw, ll - rl
    s_w, s_l = _score(rho_w, f_divergence, f_alpha), _score(rho_l, f_divergence, f_alpha)
    x = beta * (s_w - s_l)
    ls = _log_sigmoid
    nw, nl = n[:P].clamp(min=1), n[P:].clamp(min=1)
    if loss_type == "sigmoid":
        return -(1 - eps) * ls(x) - eps * ls(-x)
    if loss_type == "robust":
        return (-(1 - eps) * ls(x) + eps * ls(-x)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.clamp(1 - x, min=0)
    if loss_type == "ipo":
        return (s_w / nw - s_l / nl - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        sx, snx = torch.sigmoid(x), torch.sigmoid(-x)
        return sx * (torch.log(sx) - math.log(1 - eps)) + snx * (torch.log(snx) - math.log(eps))
    if loss_type == "nca_pair":
        return -ls(beta * rho_w) - 0.5 * ls(-beta * rho_w) - 0.5 * ls(-beta * rho_l)
    if loss_type == "bco_pair":
        return -ls(beta * rho_w) - ls(-beta * rho_l)
    if loss_type == "sppo_hard":
        return (rho_w - 1 / (2 * beta)) ** 2 + (rho_l + 1 / (2 * beta)) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        a, b = ((lw - ll), (rw - rl)) if loss_type == "aot" else (rho_w, rho_l)
        order_a, order_b = sorted(range(P), key=lambda i: a[i].item()), sorted(range(P), key=lambda i: b[i].item())
        d = torch.stack([a[order_a[i]] - b[order_b[i]] for i in range(P)]) if P else a
        return -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * rho_w) + torch.sigmoid(beta * rho_l)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rho_w) + 1 - torch.sigmoid(beta * (rho_w - rho_l))
    if loss_type == "discopop":
        m = torch.sigmoid(x / discopop_tau)
        return (1 - m) * -ls(x) + m * torch.exp(-x)
    if loss_type == "sigmoid_norm":
        return -ls(beta * (s_w / nw - s_l / nl))
    if loss_type == "sft":
        return _chosen_token_nll(tok, mask, P)
    raise ValueError(loss_type)


def pmle(hidden, weight, labels, bias=None, *, gamma, beta=0.0, ref_hidden=None, ref_weight=None, ref_bias=None,
         ref_logps=None, kl_estimator="token_exact", temperature=1.0, softcap=None, ignore_index=-100,
         precision="fp64"):
    """Oracle of :func:`fastpref.pmle_loss`: the ``(P,)`` per-pair loss, plus ``beta ·`` the pair's mean KL estimate."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol = _seq(hidden, weight, labels, bias, kw)[0]
    P = pol.shape[0] // 2
    out = -_log_sigmoid(gamma * (pol[:P] - pol[P:]))
    return out + beta * _pair_kl(hidden, weight, labels, bias, pol, ref_hidden, ref_weight, ref_bias, ref_logps,
                                 kl_estimator, kw) if beta else out


def preference_distillation(hidden, weight, labels, bias=None, *, gamma, reward_a=None, reward_b=None,
                            target_prob=None, beta=0.0, ref_hidden=None, ref_weight=None, ref_bias=None,
                            ref_logps=None, kl_estimator="sampled", temperature=1.0, softcap=None, ignore_index=-100,
                            precision="fp64"):
    """Oracle of :func:`fastpref.preference_distillation_loss`: the ``(P,)`` per-pair loss (plus ``beta ·`` KL)."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol = _seq(hidden, weight, labels, bias, kw)[0]
    P = pol.shape[0] // 2
    p = target_prob.to(pol.dtype) if target_prob is not None else 1 / (1 + torch.exp(-(reward_a - reward_b).to(pol.dtype)))
    x = gamma * (pol[:P] - pol[P:])
    out = -(p * _log_sigmoid(x) + (1 - p) * _log_sigmoid(-x))
    return out + beta * _pair_kl(hidden, weight, labels, bias, pol, ref_hidden, ref_weight, ref_bias, ref_logps,
                                 kl_estimator, kw) if beta else out


def _loo(values, k):
    out = []
    for i in range(values.shape[0]):
        g = i // k
        others = [values[j] for j in range(g * k, (g + 1) * k) if j != i]
        out.append(sum(others) / len(others) if others else values.new_zeros(()))
    return torch.stack(out)


def token_kl(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, kw):
    """(B,) Σ_t KL(π‖π₀) along the path, from materialised distributions."""
    lp = _token_logsm(hidden, weight, bias, kw["temperature"], kw["softcap"], kw["precision"])
    with torch.no_grad():
        lq = _token_logsm(ref_hidden, ref_weight, ref_bias, kw["temperature"], kw["softcap"], kw["precision"])
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return torch.where(labels != kw["ignore_index"], kl, torch.zeros_like(kl)).sum(-1)


def policy_kl(hidden, weight, labels, bias=None, *, estimator="sampled", ref_logps=None, ref_hidden=None,
              ref_weight=None, ref_bias=None, num_samples_per_prompt=1, temperature=1.0, softcap=None,
              ignore_index=-100, precision="fp64"):
    """Oracle of :func:`fastpref.policy_kl_loss`: ``(B,)`` per-sequence KL estimates whose gradient is the score-
    function surrogate's."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol = _seq(hidden, weight, labels, bias, kw)[0]
    if estimator == "token_exact":  # E_y[κ(y)]: pathwise ∇κ plus the score term κ ∇ℓ (baseline b)
        kappa = token_kl(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, kw)
        c = kappa.detach() - _loo(kappa.detach(), num_samples_per_prompt)
        return kappa + c * (pol - pol.detach())
    ref = _ref_seq(labels, ref_logps, ref_hidden, ref_weight, ref_bias, kw)
    kl = (pol - ref).detach()
    coef = kl - _loo(kl, num_samples_per_prompt)
    return kl + coef * (pol - pol.detach())  # value ℓ - ℓ₀, gradient (ℓ - ℓ₀ - b) ∇ℓ


def _pair_kl(hidden, weight, labels, bias, pol, ref_hidden, ref_weight, ref_bias, ref_logps, estimator, kw):
    kl = policy_kl(hidden, weight, labels, bias, estimator=estimator, ref_logps=ref_logps, ref_hidden=ref_hidden,
                   ref_weight=ref_weight, ref_bias=ref_bias, **kw)
    P = kl.shape[0] // 2
    return (kl[:P] + kl[P:]) / 2


def reverse_kl(hidden, weight, labels, bias=None, *, rewards, beta, gamma, num_samples_per_prompt,
               entropy="sequence", kl_estimator="sampled", ref_logps=None, ref_hidden=None, ref_weight=None,
               ref_bias=None, old_logps=None, clip_eps=0.2, temperature=1.0, softcap=None, ignore_index=-100,
               precision="fp64"):
    """Oracle of :func:`fastpref.reverse_kl_loss`: the ``(B,)`` per-sequence surrogate (RLOO baseline, optional
    clipping, entropy bonus, KL)."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, _, _, mask = _seq(hidden, weight, labels, bias, kw)
    r = rewards.to(pol.dtype)
    if beta and kl_estimator == "sampled":
        r = r - beta * (pol - _ref_seq(labels, ref_logps, ref_hidden, ref_weight, ref_bias, kw))
    if beta and kl_estimator == "token_exact":
        r = r - beta * token_kl(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, kw)
    if entropy == "sequence":
        r = r - gamma * pol
    else:
        lp0 = _token_logsm(hidden, weight, bias, temperature, softcap, precision)
        r = r + gamma * torch.where(mask, -(lp0.exp() * lp0).sum(-1), torch.zeros_like(pol[:, None])).sum(-1)
    r = r.detach()
    adv = r - _loo(r, num_samples_per_prompt)
    if old_logps is None:
        out = -adv * pol
    else:
        ratio = torch.exp(pol - old_logps)
        out = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    if beta and kl_estimator == "token_exact":
        out = out + beta * token_kl(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, kw)
    if entropy == "token_exact":
        lp = _token_logsm(hidden, weight, bias, temperature, softcap, precision)
        h = -(lp.exp() * lp).sum(-1)
        out = out - gamma * torch.where(mask, h, torch.zeros_like(h)).sum(-1)
    return out


def _chosen_nll(pol, n, tok, mask, P, nll_average):
    if nll_average == "sequence":
        return -pol[:P] / n[:P].clamp(min=1)
    return _chosen_token_nll(tok, mask, P)


def simpo(hidden, weight, labels, bias=None, *, beta=2.0, gamma_margin=1.0, label_smoothing=0.0, nll_weight=0.0,
          nll_average="token", temperature=1.0, softcap=None, ignore_index=-100, precision="fp64"):
    """Oracle of :func:`fastpref.simpo_loss`: the ``(P,)`` per-pair loss (plus the weighted chosen NLL)."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, n, tok, mask = _seq(hidden, weight, labels, bias, kw)
    P = pol.shape[0] // 2
    avg = pol / n.clamp(min=1)
    x = beta * (avg[:P] - avg[P:]) - gamma_margin
    out = -(1 - label_smoothing) * _log_sigmoid(x) - label_smoothing * _log_sigmoid(-x)
    return out + nll_weight * _chosen_nll(pol, n, tok, mask, P, nll_average) if nll_weight else out


def cpo(hidden, weight, labels, bias=None, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5,
        alphapo_alpha=0.0, cpo_alpha=None, nll_average="token", temperature=1.0, softcap=None, ignore_index=-100,
        precision="fp64"):
    """TRL 1.16's CPOTrainer.cpo_loss + cpo_alpha * NLL, spelled out."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, n, tok, mask = _seq(hidden, weight, labels, bias, kw)
    P = pol.shape[0] // 2
    if cpo_alpha is None:
        cpo_alpha = 0.0 if loss_type == "alphapo" else 1.0
    if loss_type == "alphapo":
        loss_type = "simpo"
    r = pol / n.clamp(min=1) if loss_type in ("ipo", "simpo") else pol
    if alphapo_alpha:
        r = (1 - torch.exp(r) ** (-alphapo_alpha)) / alphapo_alpha
    d = r[:P] - r[P:]
    eps = label_smoothing
    if loss_type == "sigmoid":
        out = -(1 - eps) * _log_sigmoid(beta * d) - eps * _log_sigmoid(-beta * d)
    elif loss_type == "simpo":
        z = beta * (d - simpo_gamma / beta)
        out = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
    elif loss_type == "hinge":
        out = torch.clamp(1 - beta * d, min=0)
    else:
        out = (d - 1 / (2 * beta)) ** 2
    return out + cpo_alpha * _chosen_nll(pol, n, tok, mask, P, nll_average) if cpo_alpha else out


def orpo(hidden, weight, labels, bias=None, *, nll_labels=None, beta=0.1, nll_average="token", temperature=1.0,
         softcap=None, ignore_index=-100, precision="fp64"):
    """Oracle of :func:`fastpref.orpo_loss`: the ``(P,)`` per-pair ``NLL + beta · odds-ratio term`` (no odds term for
    an empty response)."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, n, tok, mask = _seq(hidden, weight, labels, bias, kw)
    P = pol.shape[0] // 2
    odds_term = []
    for i in range(P):
        if n[i] == 0 or n[P + i] == 0:  # an empty response: no odds-ratio term
            odds_term.append(pol.new_zeros(()))
            continue
        mw, ml = pol[i] / n[i], pol[P + i] / n[P + i]  # log odds = log p - log(1 - p), p = e^m
        odds_term.append(-_log_sigmoid((mw - torch.log(-torch.expm1(mw))) - (ml - torch.log(-torch.expm1(ml)))))
    odds_term = torch.stack(odds_term) if P else pol[:0]
    if nll_labels is None:
        nll = _chosen_nll(pol, n, tok, mask, P, nll_average)
    else:
        npol, nn_, ntok, nmask = _seq(hidden[:P], weight, nll_labels, bias, kw)
        nll = _chosen_nll(torch.cat([npol, npol]), torch.cat([nn_, nn_]), ntok, nmask, P, nll_average)
    return nll + beta * odds_term


def kto(hidden, weight, labels, bias=None, *, desirable, ref_logps=None, ref_hidden=None, ref_weight=None,
        ref_bias=None, kl_logps=None, ref_kl_logps=None, beta=0.1, loss_type="kto", desirable_weight=1.0,
        undesirable_weight=1.0, batch_kl=False, temperature=1.0, softcap=None, ignore_index=-100, precision="fp64"):
    """Oracle of :func:`fastpref.kto_loss`: the ``(B,)`` per-sequence loss, one sequence at a time."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol = _seq(hidden, weight, labels, bias, kw)[0]
    rho = pol - _ref_seq(labels, ref_logps, ref_hidden, ref_weight, ref_bias, kw)
    if kl_logps is not None:
        z0 = max(float((kl_logps - ref_kl_logps).double().mean()), 0.0)
    elif batch_kl:
        z0 = max(float(rho.detach().mean()), 0.0)
    else:
        z0 = 0.0
    out = []
    for i in range(pol.shape[0]):
        if loss_type == "apo_zero_unpaired":
            term = 1 - torch.sigmoid(beta * rho[i]) if bool(desirable[i]) else torch.sigmoid(beta * rho[i])
        elif bool(desirable[i]):
            term = 1 - torch.sigmoid(beta * (rho[i] - z0))
        else:
            term = 1 - torch.sigmoid(beta * (z0 - rho[i]))
        out.append((desirable_weight if bool(desirable[i]) else undesirable_weight) * term)
    return torch.stack(out)


def npo(hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
        beta=0.1, temperature=1.0, softcap=None, ignore_index=-100, precision="fp64"):
    """Oracle of :func:`fastpref.npo_loss`: the ``(B,)`` per-sequence loss ``-(2/β) log σ(-β ρ)``."""
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol = _seq(hidden, weight, labels, bias, kw)[0]
    rho = pol - _ref_seq(labels, ref_logps, ref_hidden, ref_weight, ref_bias, kw)
    return -(2 / beta) * _log_sigmoid(-beta * rho)


def distill(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *, kind="forward_kl", beta=0.5,
            temperature=1.0, student_bias=None, teacher_bias=None, hard_weight=0.0, soft_weight=1.0,
            student_softcap=None, teacher_softcap=None, ignore_index=-100, precision="fp64"):
    """Per-token ``soft_weight · div + hard_weight · NLL`` (0 where ignored; every token counts without labels)."""
    ls = _token_logsm(student_hidden, student_weight, student_bias, temperature, student_softcap, precision)
    with torch.no_grad():
        lt = _token_logsm(teacher_hidden, teacher_weight, teacher_bias, temperature, teacher_softcap, precision)
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        div = (pt * (lt - ls)).sum(-1)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        div = (ps * (ls - lt)).sum(-1)
    else:
        # log m in log space: a probability that underflows in m itself would give 0 * log 0
        log_m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        div = beta * (pt * (lt - log_m)).sum(-1) + (1 - beta) * (ps * (ls - log_m)).sum(-1)
    out = soft_weight * div
    if hard_weight:
        tok, _ = token_logps(student_hidden, student_weight, labels, student_bias, softcap=student_softcap,
                             ignore_index=ignore_index, precision=precision)
        out = out - hard_weight * tok
    return out if labels is None else torch.where(labels != ignore_index, out, torch.zeros_like(out))


def nll(hidden, weight, labels, bias=None, *, temperature=1.0, softcap=None, ignore_index=-100,
        precision="fp64") -> torch.Tensor:
    """Oracle of :func:`fastpref.nll_loss`: ``-log p`` of each label ``(B, T)``, 0 where ignored."""
    tok, _ = token_logps(hidden, weight, labels, bias, temperature=temperature, softcap=softcap,
                         ignore_index=ignore_index, precision=precision)
    return -tok

