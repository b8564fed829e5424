"""Oracle versions of every loss (SPEC §4), written independently of ``fastpref.objectives`` and
``fastpref.losses``: full logits materialised, formulas spelled out from the papers, explicit
loops where the fast path vectorises.  All return the **unreduced** loss (per pair, per
sequence or per token) in float64 (``precision="fp64"``) or in plain-PyTorch precision
(``precision="native"``).  Gradients come from autograd.
"""

from __future__ import annotations

import math

import torch

from .primitives import materialize_logits


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
    if f_divergence == "reverse_kl":
        return rho
    if f_divergence == "forward_kl":
        return -torch.exp(-rho)
    if f_divergence == "js_divergence":
        return torch.log(2 * torch.exp(rho) / (1 + torch.exp(rho))) - math.log(2)  # log(2u/(1+u)) - log 2
    return torch.exp((f_alpha - 1) * rho) / (f_alpha - 1)


def dpo(hidden, weight, labels, bias=None, *, ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden=None,
        ref_weight=None, ref_bias=None, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
        f_divergence="reverse_kl", f_alpha=0.5, rpo_alpha=None, use_weighting=False, ld_alpha=None,
        discopop_tau=0.05, temperature=1.0, softcap=None, ignore_index=-100, precision="fp64"):
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, n, tok, mask = _seq(hidden, weight, labels, bias, kw, ld_alpha)
    pre = None if ref_chosen_logps is None else torch.cat([ref_chosen_logps, ref_rejected_logps])
    ref = _ref_seq(labels, pre, ref_hidden, ref_weight, ref_bias, kw, ld_alpha)
    ref = torch.zeros_like(pol) if ref is None else ref
    P = pol.shape[0] // 2
    lw, ll, rw, rl = pol[:P], pol[P:], ref[:P], ref[P:]
    eps = label_smoothing
    rho_w, rho_l = lw - rw, ll - rl
    x = beta * (_score(rho_w, f_divergence, f_alpha) - _score(rho_l, f_divergence, f_alpha))
    ls = _log_sigmoid
    if loss_type == "sigmoid":
        out = -(1 - eps) * ls(x) - eps * ls(-x)
    elif loss_type == "robust":
        out = (-(1 - eps) * ls(x) + eps * ls(-x)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        out = torch.clamp(1 - x, min=0)
    elif loss_type == "ipo":
        out = (rho_w / n[:P] - rho_l / n[P:] - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        e = eps or 1e-3
        sx, snx = torch.sigmoid(x), torch.sigmoid(-x)
        out = sx * (torch.log(sx) - math.log(1 - e)) + snx * (torch.log(snx) - math.log(e))
    elif loss_type == "nca_pair":
        out = -ls(beta * rho_w) - 0.5 * ls(-beta * rho_w) - 0.5 * ls(-beta * rho_l)
    elif loss_type == "bco_pair":
        out = -ls(beta * rho_w) - ls(-beta * rho_l)
    elif loss_type == "sppo_hard":
        out = (rho_w - 1 / (2 * beta)) ** 2 + (rho_l + 1 / (2 * beta)) ** 2
    elif loss_type in ("aot", "aot_unpaired"):
        a, b = ((lw - ll), (rw - rl)) if loss_type == "aot" else (rho_w, rho_l)
        order_a, order_b = sorted(range(P), key=lambda i: a[i].item()), sorted(range(P), key=lambda i: b[i].item())
        d = torch.stack([a[order_a[i]] - b[order_b[i]] for i in range(P)])
        out = -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    elif loss_type == "apo_zero":
        out = 1 - torch.sigmoid(beta * rho_w) + torch.sigmoid(beta * rho_l)
    elif loss_type == "apo_down":
        out = torch.sigmoid(beta * rho_w) + 1 - torch.sigmoid(x)
    elif loss_type == "discopop":
        m = torch.sigmoid(x / discopop_tau)
        out = (1 - m) * -ls(x) + m * torch.exp(-x)
    elif loss_type == "sigmoid_norm":
        out = -ls(beta * (rho_w / n[:P] - rho_l / n[P:]))
    else:
        raise ValueError(loss_type)
    if use_weighting:
        with torch.no_grad():
            logsm = _token_logsm(hidden, weight, bias, temperature, softcap, precision)
            log_sum_p2 = torch.log((logsm.exp() ** 2).sum(-1))
            w_tok = torch.where(mask, tok - log_sum_p2, torch.zeros_like(tok))
            w_seq = w_tok.sum(-1) / n
            weights = torch.clamp(torch.exp(w_seq[:P] + w_seq[P:]), max=1)
        out = out * weights
    if rpo_alpha is not None:
        out = out + rpo_alpha * (-lw / n[:P])
    return out


def pmle(hidden, weight, labels, bias=None, *, gamma, beta=0.0, ref_hidden=None, ref_weight=None, ref_bias=None,
         ref_logps=None, kl_estimator="token_exact", temperature=1.0, softcap=None, ignore_index=-100,
         precision="fp64"):
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
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    if estimator == "token_exact":
        return token_kl(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, kw)
    pol = _seq(hidden, weight, labels, bias, kw)[0]
    ref = _ref_seq(labels, ref_logps, ref_hidden, ref_weight, ref_bias, kw)
    kl = (pol - ref).detach()
    coef = kl - _loo(kl, num_samples_per_prompt)
    return kl + coef * (pol - pol.detach())  # value ℓ - ℓ₀, gradient (ℓ - ℓ₀ - b) ∇ℓ


def _pair_kl(hidden, weight, labels, bias, pol, ref_hidden, ref_weight, ref_bias, ref_logps, estimator, kw):
    kl = policy_kl(hidden, weight, labels, bias, estimator=estimator, ref_logps=ref_logps, ref_hidden=ref_hidden,
                   ref_weight=ref_weight, ref_bias=ref_bias, **kw)
    P = kl.shape[0] // 2
    return (kl[:P] + kl[P:]) / 2


def reverse_kl(hidden, weight, labels, rewards, *, beta, gamma, num_samples_per_prompt, bias=None,
               entropy="sequence", kl_estimator="sampled", ref_logps=None, ref_hidden=None, ref_weight=None,
               ref_bias=None, old_logps=None, clip_eps=0.2, temperature=1.0, softcap=None, ignore_index=-100,
               precision="fp64"):
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, _, _, mask = _seq(hidden, weight, labels, bias, kw)
    r = rewards.to(pol.dtype)
    if beta and kl_estimator == "sampled":
        r = r - beta * (pol - _ref_seq(labels, ref_logps, ref_hidden, ref_weight, ref_bias, kw))
    if entropy == "sequence":
        r = r - gamma * pol
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


def simpo(hidden, weight, labels, bias=None, *, beta=2.0, gamma_margin=1.0, label_smoothing=0.0, temperature=1.0,
          softcap=None, ignore_index=-100, precision="fp64"):
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, n, _, _ = _seq(hidden, weight, labels, bias, kw)
    P = pol.shape[0] // 2
    x = beta * (pol[:P] / n[:P] - pol[P:] / n[P:]) - gamma_margin
    return -(1 - label_smoothing) * _log_sigmoid(x) - label_smoothing * _log_sigmoid(-x)


def cpo(hidden, weight, labels, bias=None, *, beta=0.1, alpha=1.0, label_smoothing=0.0, temperature=1.0,
        softcap=None, ignore_index=-100, precision="fp64"):
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, n, _, _ = _seq(hidden, weight, labels, bias, kw)
    P = pol.shape[0] // 2
    x = beta * (pol[:P] - pol[P:])
    return -(1 - label_smoothing) * _log_sigmoid(x) - label_smoothing * _log_sigmoid(-x) + alpha * (-pol[:P] / n[:P])


def orpo(hidden, weight, labels, bias=None, *, beta=0.1, temperature=1.0, softcap=None, ignore_index=-100,
         precision="fp64"):
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol, n, _, _ = _seq(hidden, weight, labels, bias, kw)
    P = pol.shape[0] // 2
    p = torch.exp(pol / n)
    log_odds = torch.log(p / (1 - p))
    return -pol[:P] / n[:P] - beta * _log_sigmoid(log_odds[:P] - log_odds[P:])


def kto(hidden, weight, labels, bias=None, *, desirable, ref_logps=None, ref_hidden=None, ref_weight=None,
        ref_bias=None, kl_logps=None, ref_kl_logps=None, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
        temperature=1.0, softcap=None, ignore_index=-100, precision="fp64"):
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol = _seq(hidden, weight, labels, bias, kw)[0]
    rho = pol - _ref_seq(labels, ref_logps, ref_hidden, ref_weight, ref_bias, kw)
    src = (kl_logps - ref_kl_logps).to(pol.dtype) if kl_logps is not None else rho
    z0 = max(float(src.detach().mean()), 0.0)
    out = []
    for i in range(pol.shape[0]):
        if bool(desirable[i]):
            out.append(desirable_weight * (1 - torch.sigmoid(beta * (rho[i] - z0))))
        else:
            out.append(undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rho[i]))))
    return torch.stack(out)


def npo(hidden, weight, labels, bias=None, *, ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
        beta=0.1, temperature=1.0, softcap=None, ignore_index=-100, precision="fp64"):
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, precision=precision)
    pol = _seq(hidden, weight, labels, bias, kw)[0]
    rho = pol - _ref_seq(labels, ref_logps, ref_hidden, ref_weight, ref_bias, kw)
    return -(2 / beta) * _log_sigmoid(-beta * rho)


def distill(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *, kind="forward_kl", beta=0.5,
            temperature=1.0, student_bias=None, teacher_bias=None, hard_weight=0.0, soft_weight=1.0,
            ignore_index=-100, precision="fp64"):
    """Per-token ``soft_weight · div + hard_weight · NLL`` (0 where ignored)."""
    ls = _token_logsm(student_hidden, student_weight, student_bias, temperature, None, precision)
    with torch.no_grad():
        lt = _token_logsm(teacher_hidden, teacher_weight, teacher_bias, temperature, None, precision)
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        div = (pt * (lt - ls)).sum(-1)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        div = (ps * (ls - lt)).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        div = beta * (pt * (lt - m.log())).sum(-1) + (1 - beta) * (ps * (ls - m.log())).sum(-1)
    out = soft_weight * div
    if hard_weight:
        tok, _ = token_logps(student_hidden, student_weight, labels, student_bias, ignore_index=ignore_index,
                             precision=precision)
        out = out - hard_weight * tok
    return torch.where(labels != ignore_index, out, torch.zeros_like(out))


def nll(hidden, weight, labels, bias=None, *, temperature=1.0, softcap=None, ignore_index=-100,
        precision="fp64") -> torch.Tensor:
    tok, _ = token_logps(hidden, weight, labels, bias, temperature=temperature, softcap=softcap,
                         ignore_index=ignore_index, precision=precision)
    return -tok

