"""fastpref's losses against Liger-Kernel 0.8.5's chunked losses, on the same inputs.

Two comparisons per loss:
- **formula, float64**: Liger's own ``preference_loss_fn`` / ``distillation_loss_fn`` (its loss formula,
  without its fused head) fed float64 per-sequence log-probs (or logits) that ``fastpref.reference``
  computes from the same hidden states, against ``fastpref``'s fused loss in float64, values and
  gradients (autograd through the materialised reference).
- **fused module**: Liger's ``LigerFusedLinear*Loss`` (``compiled=False``, pure PyTorch) on the same
  float64 hidden states and head.  Liger's head takes ``log_softmax(logits.float())`` and accumulates
  the loss in float32 whatever the input dtype, so agreement is bounded by float32 rounding.

Each test prints ``Liger <family> <case>: ...``; run with ``-s`` to see them.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastpref as fp
from fastpref.reference import primitives as refp

pytest.importorskip("liger_kernel")
from liger_kernel.chunked_loss import (  # noqa: E402
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearJSDLoss,
    LigerFusedLinearKTOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
)
from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOFunction  # noqa: E402
from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction  # noqa: E402
from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction  # noqa: E402
from liger_kernel.chunked_loss.kto_loss import LigerFusedLinearKTOFunction  # noqa: E402
from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction  # noqa: E402
from liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction  # noqa: E402

F64 = torch.float64
P, T, D, V = 3, 8, 12, 37
B = 2 * P
FUSED_RTOL = 2e-6  # float32 log-softmax and accumulation inside Liger's fused head


def _batch(gen):
    h = torch.randn(B, T, D, generator=gen, dtype=F64)
    w = torch.randn(V, D, generator=gen, dtype=F64) * (1.5 / D**0.5)
    rh = h + 0.3 * torch.randn(B, T, D, generator=gen, dtype=F64)
    rw = w + 0.05 * torch.randn(V, D, generator=gen, dtype=F64)
    y = torch.randint(0, V, (B, T), generator=gen)
    y[:, :2] = -100
    for i, pad in enumerate(torch.randint(0, 3, (B,), generator=gen).tolist()):
        if pad:
            y[i, T - pad:] = -100
    return h.requires_grad_(), w.requires_grad_(), rh, rw, y


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _compare(family, case, liger, ours, leaves, *, rtol, grad_rtol):
    g_l = torch.autograd.grad(liger, leaves, retain_graph=True, allow_unused=True)
    g_o = torch.autograd.grad(ours, leaves, allow_unused=True)
    diff = abs(float(liger.detach()) - float(ours.detach()))
    gdiff, gscale = 0.0, 0.0
    for a, b in zip(g_l, g_o):
        a = torch.zeros_like(b) if a is None else a
        gdiff = max(gdiff, (a.double() - b.double()).abs().max().item())
        gscale = max(gscale, a.double().abs().max().item())
    print(f"Liger {family} {case}: |loss diff| {diff:.2e} (loss {float(liger):.4f}), |grad diff| {gdiff:.2e} "
          f"(grad scale {gscale:.2e})")
    assert math.isfinite(float(ours))
    assert diff <= rtol * max(1.0, abs(float(liger))), (family, case, diff)
    assert gdiff <= grad_rtol * max(1.0, gscale), (family, case, gdiff)


def _seq(h, w, y, average=False):
    return refp.sequence_logprobs(h, w, y, average=average)


# ----------------------------------------------------------------------------- DPO

LIGER_DPO_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                   "apo_down", "discopop"]
_EPS = {"exo_pair": 1e-3, "robust": 0.1}


@pytest.mark.parametrize("loss_type", LIGER_DPO_TYPES)
def test_dpo_formula_matches_liger_fp64(loss_type, gen):
    h, w, rh, rw, y = _batch(gen)
    eps = _EPS.get(loss_type, 0.0)
    lp = _seq(h, w, y)
    with torch.no_grad():
        rlp = _seq(rh, rw, y)
    liger = LigerFusedLinearDPOFunction.preference_loss_fn(
        lp[:P], lp[P:], y, ref_chosen_logps=rlp[:P], ref_rejected_logps=rlp[P:], beta=0.3, loss_type=loss_type,
        label_smoothing=eps)[0]
    ours = fp.dpo_loss(h, w, y, ref_hidden=rh, ref_weight=rw, beta=0.3, loss_type=loss_type, label_smoothing=eps,
                       backend="torch")
    # Liger builds EXO's ε as a float32 tensor (log ε, log(1 - ε) carry float32 rounding)
    tol = 1e-7 if loss_type == "exo_pair" else 1e-10
    _compare("DPO", f"{loss_type}-formula-fp64", liger, ours, [h, w], rtol=tol, grad_rtol=tol)


@pytest.mark.parametrize("loss_type", LIGER_DPO_TYPES)
def test_dpo_fused_matches_liger(loss_type, gen):
    h, w, rh, rw, y = _batch(gen)
    eps = _EPS.get(loss_type, 0.0)
    liger = _first(LigerFusedLinearDPOLoss(beta=0.3, loss_type=loss_type, label_smoothing=eps, compiled=False)(
        w, h, y, ref_input=rh, ref_weight=rw))
    ours = fp.dpo_loss(h, w, y, ref_hidden=rh, ref_weight=rw, beta=0.3, loss_type=loss_type, label_smoothing=eps,
                       backend="torch")
    _compare("DPO", f"{loss_type}-fused", liger, ours, [h, w], rtol=FUSED_RTOL, grad_rtol=FUSED_RTOL)


def test_dpo_rpo_fused_matches_liger_nll(gen):
    """Liger's DPO with compute_nll_loss: alpha · (mean NLL over every chosen token) = fastpref's rpo_alpha."""
    h, w, rh, rw, y = _batch(gen)
    liger = _first(LigerFusedLinearDPOLoss(beta=0.2, alpha=0.6, compute_nll_loss=True, compiled=False)(
        w, h, y, ref_input=rh, ref_weight=rw))
    ours = fp.dpo_loss(h, w, y, ref_hidden=rh, ref_weight=rw, beta=0.2, rpo_alpha=0.6, backend="torch")
    _compare("DPO", "rpo0.6-fused", liger, ours, [h, w], rtol=FUSED_RTOL, grad_rtol=FUSED_RTOL)


# ----------------------------------------------------------------------------- CPO, SimPO, ORPO


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cpo_matches_liger(label_smoothing, gen):
    h, w, _, _, y = _batch(gen)
    lp = _seq(h, w, y)
    formula = LigerFusedLinearCPOFunction.preference_loss_fn(lp[:P], lp[P:], y, beta=0.2,
                                                             label_smoothing=label_smoothing)[0]
    ours = fp.cpo_loss(h, w, y, beta=0.2, label_smoothing=label_smoothing, cpo_alpha=0.0, backend="torch")
    _compare("CPO", f"ls{label_smoothing}-formula-fp64", formula, ours, [h, w], rtol=1e-10, grad_rtol=1e-10)
    fused = _first(LigerFusedLinearCPOLoss(beta=0.2, alpha=0.7, label_smoothing=label_smoothing, compiled=False)(w, h, y))
    ours = fp.cpo_loss(h, w, y, beta=0.2, label_smoothing=label_smoothing, cpo_alpha=0.7, backend="torch")
    _compare("CPO", f"ls{label_smoothing}-nll0.7-fused", fused, ours, [h, w], rtol=FUSED_RTOL, grad_rtol=FUSED_RTOL)


@pytest.mark.parametrize("nll", [0.0, 0.5])
def test_simpo_matches_liger(nll, gen):
    h, w, _, _, y = _batch(gen)
    avg = _seq(h, w, y, average=True)
    formula = LigerFusedLinearSimPOFunction.preference_loss_fn(avg[:P], avg[P:], y, beta=2.0, gamma=0.6,
                                                               label_smoothing=0.05)[0]
    ours = fp.simpo_loss(h, w, y, beta=2.0, gamma_margin=0.6, label_smoothing=0.05, backend="torch")
    _compare("SimPO", "formula-fp64", formula, ours, [h, w], rtol=1e-10, grad_rtol=1e-10)
    fused = _first(LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.6, alpha=nll, label_smoothing=0.05,
                                             compute_nll_loss=nll > 0, compiled=False)(w, h, y))
    ours = fp.simpo_loss(h, w, y, beta=2.0, gamma_margin=0.6, label_smoothing=0.05, nll_weight=nll, backend="torch")
    _compare("SimPO", f"nll{nll}-fused", fused, ours, [h, w], rtol=FUSED_RTOL, grad_rtol=FUSED_RTOL)


@pytest.mark.parametrize("nll_target", [False, True])
def test_orpo_matches_liger(nll_target, gen):
    h, w, _, _, y = _batch(gen)
    avg = _seq(h, w, y, average=True)
    formula = LigerFusedLinearORPOFunction.preference_loss_fn(avg[:P], avg[P:], y, beta=0.3)[0]
    ours_odds = fp.orpo_loss(h, w, y, beta=0.3, return_metrics=True, backend="torch")[1]["preference_loss"]
    print(f"Liger ORPO odds-term-fp64: |diff| {abs(float(formula) - float(ours_odds)):.2e}")
    assert abs(float(formula) - float(ours_odds)) <= 1e-12
    target = None
    if nll_target:  # Liger's nll_target: the NLL also scores the prompt tokens
        target = y[:P].clone()
        target[:, :2] = torch.randint(0, V, (P, 2), generator=gen)
    full = None if target is None else torch.cat([target, y[P:]])  # Liger's nll_target spans both halves
    fused = _first(LigerFusedLinearORPOLoss(beta=0.3, compiled=False)(w, h, y, nll_target=full))
    ours = fp.orpo_loss(h, w, y, beta=0.3, nll_labels=target, backend="torch")
    _compare("ORPO", f"nll_target{nll_target}-fused", fused, ours, [h, w], rtol=FUSED_RTOL, grad_rtol=FUSED_RTOL)


# ----------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("with_kl", [False, True])
def test_kto_matches_liger(with_kl, gen):
    h, w, rh, rw, y = _batch(gen)
    des = torch.tensor([True, False, True, True, False, False])
    kw, kl = {}, None
    if with_kl:  # KL completions: here, the batch's rows rolled by one against the reference
        with torch.no_grad():
            kl_logps, ref_kl = _seq(h, w, y.roll(1, 0)), _seq(rh, rw, y.roll(1, 0))
        kw = dict(kl_logps=kl_logps, ref_kl_logps=ref_kl)
        kl = (kl_logps - ref_kl).mean().clamp(min=0)
    lp = _seq(h, w, y)
    with torch.no_grad():
        rlp = _seq(rh, rw, y)
    formula = LigerFusedLinearKTOFunction.preference_loss_fn(lp, des, y, ref_log_prob_chunk=rlp, beta=0.4, kl=kl)[0]
    ours = fp.kto_loss(h, w, y, desirable=des, ref_hidden=rh, ref_weight=rw, beta=0.4, backend="torch", **kw)
    _compare("KTO", f"kl{with_kl}-formula-fp64", formula, ours, [h, w], rtol=1e-10, grad_rtol=1e-10)
    fused = _first(LigerFusedLinearKTOLoss(beta=0.4, use_ref_model=True, compiled=False)(
        h, w, y, preference_labels=des, ref_input=rh, ref_weight=rw, kl=kl))
    _compare("KTO", f"kl{with_kl}-fused", fused,
             fp.kto_loss(h, w, y, desirable=des, ref_hidden=rh, ref_weight=rw, beta=0.4, backend="torch", **kw),
             [h, w], rtol=FUSED_RTOL, grad_rtol=FUSED_RTOL)


# ----------------------------------------------------------------------------- distillation (JSD)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_jsd_matches_liger(beta, gen):
    h, w, rh, rw, y = _batch(gen)
    temp = 1.5
    zs = refp.materialize_logits(h, w, temperature=temp).reshape(-1, V)
    with torch.no_grad():
        zt = refp.materialize_logits(rh, rw, temperature=temp).reshape(-1, V)
    count = (y != -100).sum()
    formula = LigerFusedLinearJSDFunction.distillation_loss_fn(zs, zt, beta=beta, target=y.reshape(-1)) / count
    ours = fp.distill_loss(h, w, rh, rw, y, kind="jsd", beta=beta, temperature=temp, backend="torch")
    _compare("distill", f"jsd-beta{beta}-formula-fp64", formula, ours, [h, w], rtol=1e-10, grad_rtol=1e-10)
    fused = _first(LigerFusedLinearJSDLoss(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=beta, temperature=temp,
                                           compiled=False)(h.reshape(-1, D), w, rh.reshape(-1, D), rw, y.reshape(-1)))
    ours = fp.distill_loss(h, w, rh, rw, y, kind="jsd", beta=beta, temperature=temp, hard_weight=0.3, soft_weight=0.7,
                           backend="torch")
    _compare("distill", f"jsd-beta{beta}-hard0.3-fused", fused, ours, [h, w], rtol=FUSED_RTOL, grad_rtol=FUSED_RTOL)


# ----------------------------------------------------------------------------- NLL (SFT)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nll_matches_liger_fused_linear_cross_entropy(reduction, gen):
    """Liger's fused linear cross-entropy is a Triton kernel (the interpreter here): float32 inputs.  (Its
    softcap branch does not run under the Triton interpreter, so softcap is not compared.)"""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    h, w, _, _, y = _batch(gen)
    h, w = h.detach().float().reshape(-1, D).requires_grad_(), w.detach().float().requires_grad_()
    y = y.reshape(-1)
    liger = LigerFusedLinearCrossEntropyLoss(reduction=reduction)(w, h, y)
    ours = fp.nll_loss(h, w, y, reduction=reduction, backend="torch")
    _compare("NLL", f"{reduction}-fp32", liger, ours, [h, w], rtol=2e-6, grad_rtol=2e-6)
