"""The bad-input battery: every public entry point (primitives, losses, module twins, objectives,
configuration) fed wrong shapes, dtypes (every integer width for labels), devices ("meta" tensors
stand for another device), non-finite and out-of-range hyper-parameters, lists instead of tensors,
all-ignored and empty batches, extreme logits, non-contiguous and stride-0 layouts, autocast,
no_grad and inference_mode.

Every case states its expectation, one of:
- ``Raises(exc, name)``: that exception, with a message naming the argument;
- ``Oracle(...)``: the value (and finite gradients) of the float64 reference (``fastpref.reference``);
- ``Same(...)``: the value of the same call on plain inputs (int64 labels, contiguous tensors, grad mode);
- ``IsNaN()``: NaN (a NaN input propagates);
- ``Finite(...)``: a finite value (and metrics), zero gradients where nothing is counted.

- ``Returns(value)``: exactly that Python value.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastpref as fp
from fastpref import objectives as obj
from fastpref.reference import losses as oracle
from fastpref.reference import primitives as ref_prims

P, T, D, V = 2, 5, 8, 29
B = 2 * P
F64 = torch.float64
META = torch.device("meta")


# ----------------------------------------------------------------------------- inputs


def make(gen, *, b=B, v=V, wide=True):
    """Fresh float64 tensors for one case: policy and reference heads, labels with a 1-token prompt
    and a padded row, per-sequence options; ``t["wide"]``: the same with a vocabulary of 200 (labels
    up to 199 do not fit int8; -100 wraps to 156 in uint8)."""
    r = lambda *s, scale=1.0: torch.randn(*s, generator=gen, dtype=F64) * scale  # noqa: E731
    y = torch.randint(0, v, (b, T), generator=gen)
    y[:, 0] = -100
    if b:
        y[b - 1, -1] = -100
    t = dict(h=r(b, T, D), w=r(v, D, scale=1.5 / D**0.5), bias=r(v, scale=0.2), rh=r(b, T, D),
             rw=r(v, D, scale=1.5 / D**0.5), y=y, rewards=r(b), old=r(b) - 10.0, pre=r(b) - 10.0,
             des=torch.arange(b) % 2 == 0, pa=r(b // 2), pb=r(b // 2), prob=torch.rand(b // 2, generator=gen, dtype=F64))
    if wide:
        t["wide"] = make(gen, b=b, v=200, wide=False)
        t["wide"]["y"][:, 1] = 156
        t["wide"]["y"][:, 2] = 130
    return t


# ----------------------------------------------------------------------------- expectations


class Raises:
    def __init__(self, exc, name):
        self.exc, self.name = exc, name

    def check(self, thunk, t):
        with pytest.raises(self.exc) as info:
            thunk(t)
        assert self.name in str(info.value), f"message does not name {self.name!r}: {info.value}"


def _scalar(out):
    return out[0] if isinstance(out, tuple) else out


def _metrics_finite(out):
    if isinstance(out, tuple):
        for k, v in out[1].items():
            assert torch.isfinite(v).all(), f"metric {k} not finite: {v}"


class Oracle:
    """Value equal to the float64 reference's (mean over its unreduced output); finite gradients."""

    def __init__(self, ref_thunk, rtol=1e-9):
        self.ref_thunk, self.rtol = ref_thunk, rtol

    def check(self, thunk, t):
        t["h"].requires_grad_()
        out = thunk(t)
        want = self.ref_thunk(t)
        want = want.mean() if want.dim() else want
        got = _scalar(out)
        torch.testing.assert_close(got.double(), want.double().detach(), rtol=self.rtol, atol=1e-12)
        _metrics_finite(out)
        if got.requires_grad:
            (g,) = torch.autograd.grad(got, t["h"])
            assert torch.isfinite(g).all()


class Same:
    """Value (and metrics) equal to ``other(t)``: the same call on plain inputs (int64 labels,
    contiguous tensors, grad mode on); ``other=None`` is the case's own call outside any context."""

    def __init__(self, other=None, rtol=1e-12):
        self.other, self.rtol = other, rtol

    def check(self, thunk, t):
        got = thunk(t)
        want = self.other(t)
        torch.testing.assert_close(_scalar(got).double(), _scalar(want).double(), rtol=self.rtol, atol=1e-12)
        _metrics_finite(got)


class Returns:
    def __init__(self, value):
        self.value = value

    def check(self, thunk, t):
        assert thunk(t) == self.value


class IsNaN:
    def check(self, thunk, t):
        assert torch.isnan(_scalar(thunk(t))).any()


class Finite:
    """A finite loss (``value`` if given) and metrics; with ``zero_grad``, a zero gradient on hidden."""

    def __init__(self, value=None, zero_grad=False):
        self.value, self.zero_grad = value, zero_grad

    def check(self, thunk, t):
        t["h"].requires_grad_()
        out = thunk(t)
        loss = _scalar(out)
        assert torch.isfinite(loss).all(), loss
        _metrics_finite(out)
        if self.value is not None:
            assert abs(float(loss.detach()) - self.value) < 1e-12, float(loss.detach())
        if loss.requires_grad:
            (g,) = torch.autograd.grad(loss.sum(), t["h"])
            assert torch.isfinite(g).all()
            if self.zero_grad:
                assert (g == 0).all()


# ----------------------------------------------------------------------------- the losses

# name -> (function, oracle, base keyword arguments from the tensors, paired?)
REF = lambda t: dict(ref_hidden=t["rh"], ref_weight=t["rw"])  # noqa: E731
LOSSES = {
    "dpo_loss": (fp.dpo_loss, oracle.dpo, lambda t: REF(t), True),
    "pmle_loss": (fp.pmle_loss, oracle.pmle, lambda t: dict(gamma=0.5, beta=0.1, **REF(t)), True),
    "preference_distillation_loss": (fp.preference_distillation_loss, oracle.preference_distillation,
                                     lambda t: dict(gamma=0.3, reward_a=t["pa"], reward_b=t["pb"]), True),
    "reverse_kl_loss": (fp.reverse_kl_loss, oracle.reverse_kl, lambda t: dict(
        rewards=t["rewards"], beta=0.1, gamma=0.05, num_samples_per_prompt=2, **REF(t)), False),
    "policy_kl_loss": (fp.policy_kl_loss, oracle.policy_kl, lambda t: dict(estimator="token_exact", **REF(t)), False),
    "simpo_loss": (fp.simpo_loss, oracle.simpo, lambda t: dict(nll_weight=0.3), True),
    "cpo_loss": (fp.cpo_loss, oracle.cpo, lambda t: dict(), True),
    "orpo_loss": (fp.orpo_loss, oracle.orpo, lambda t: dict(), True),
    "kto_loss": (fp.kto_loss, oracle.kto, lambda t: dict(desirable=t["des"], **REF(t)), False),
    "npo_loss": (fp.npo_loss, oracle.npo, lambda t: dict(**REF(t)), False),
    "nll_loss": (fp.nll_loss, oracle.nll, lambda t: dict(), False),
}
METRICS = {"dpo_loss", "pmle_loss", "preference_distillation_loss", "reverse_kl_loss", "simpo_loss", "cpo_loss",
           "orpo_loss", "kto_loss", "npo_loss"}


def call(name, t, *, metrics=False, **over):
    fn, _, base, _ = LOSSES[name]
    kw = {"backend": "torch", **base(t), **over}
    if metrics and name in METRICS:
        kw["return_metrics"] = True
    return fn(t["h"], t["w"], t["y"], t.get("b"), **kw)


def oracle_of(name, base_kw=True, **over):
    """The reference's loss, reduced like the fused one (nll_loss: mean over the counted tokens)."""
    def run(t):
        _, ora, base, _ = LOSSES[name]
        kw = {**(base(t) if base_kw else {}), **over}
        out = ora(t["h"], t["w"], t["y"], t.get("b"), **kw)
        return out.sum() / (t["y"] != -100).sum() if name == "nll_loss" else out
    return run


def _set(key, fn):
    def thunk_maker(name, **over):
        return lambda t: call(name, dict(t, **{key: fn(t)}), **over)
    return thunk_maker


CASES = []


def case(cid, thunk, expect, *marks):
    CASES.append(pytest.param(thunk, expect, id=cid, marks=list(marks)))


def _with(t, **kw):
    out = dict(t)
    out.update(kw)
    return out


def _ints(t, dtype):
    """The labels in an integer dtype: ignored positions become a real label where -100 cannot be stored,
    labels above 127 are folded below 128 for int8."""
    y = t["y"].clone()
    if not dtype.is_signed:
        y[y == -100] = 7
    if dtype == torch.int8:
        y = torch.where(y > 127, y % 128, y)
    return y.to(dtype)


def _wide(t, dtype, plain=False):
    """The wide-vocabulary batch with its labels in ``dtype`` (``plain``: the same values as int64)."""
    w = t["wide"]
    return _with(w, y=_ints(w, dtype).long() if plain else _ints(w, dtype))


INT_WIDTHS = [torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16, torch.uint32, torch.uint64]

for name, (_fn, _ora, _base, paired) in LOSSES.items():
    c = lambda t, name=name, **over: call(name, t, **over)  # noqa: E731
    # ---- shapes, dtypes, devices of the positional tensors
    case(f"{name}-hidden-list", lambda t, c=c: c(_with(t, h=t["h"].tolist())), Raises(TypeError, "hidden"))
    case(f"{name}-hidden-int", lambda t, c=c: c(_with(t, h=t["h"].long())), Raises(TypeError, "hidden"))
    if name != "nll_loss":  # nll_loss takes any (..., D)
        case(f"{name}-hidden-2d", lambda t, c=c: c(_with(t, h=t["h"][:, 0], y=t["y"][:, 0])), Raises(ValueError, "hidden"))
    case(f"{name}-hidden-D", lambda t, c=c: c(_with(t, h=t["h"][..., :-1])), Raises(ValueError, "hidden"))
    case(f"{name}-weight-dtype", lambda t, c=c: c(_with(t, w=t["w"].float())), Raises(TypeError, "weight"))
    case(f"{name}-weight-1d", lambda t, c=c: c(_with(t, w=t["w"][0])), Raises(ValueError, "weight"))
    case(f"{name}-weight-meta", lambda t, c=c: c(_with(t, w=t["w"].to(META))), Raises(ValueError, "weight"))
    case(f"{name}-bias-shape", lambda t, c=c: c(_with(t, b=t["bias"][:-1])), Raises(ValueError, "bias"))
    case(f"{name}-bias-meta", lambda t, c=c: c(_with(t, b=t["bias"].to(META))), Raises(ValueError, "bias"))
    case(f"{name}-labels-float", lambda t, c=c: c(_with(t, y=t["y"].double())), Raises(TypeError, "labels"))
    case(f"{name}-labels-bool", lambda t, c=c: c(_with(t, y=t["y"] > 0)), Raises(TypeError, "labels"))
    case(f"{name}-labels-list", lambda t, c=c: c(_with(t, y=t["y"].tolist())), Raises(TypeError, "labels"))
    case(f"{name}-labels-shape", lambda t, c=c: c(_with(t, y=t["y"][:, :-1])), Raises(ValueError, "labels"))
    case(f"{name}-labels-meta", lambda t, c=c: c(_with(t, y=t["y"].to(META))), Raises(ValueError, "labels"))
    case(f"{name}-labels-V", lambda t, c=c: c(_with(t, y=t["y"].clamp(min=0) + V)), Raises(ValueError, "labels"))
    case(f"{name}-labels-minus1", lambda t, c=c: c(_with(t, y=t["y"].masked_fill(t["y"] == -100, -1))),
         Raises(ValueError, "labels"))
    if paired:
        case(f"{name}-odd-rows", lambda t, c=c: c(_with(t, h=t["h"][:3], y=t["y"][:3], rh=t["rh"][:3])),
             Raises(ValueError, "hidden"))
    for dt in INT_WIDTHS:
        case(f"{name}-labels-{str(dt)[6:]}", lambda t, c=c, dt=dt: c(_wide(t, dt)),
             Same(lambda t, c=c, dt=dt: c(_wide(t, dt, plain=True))))
    # ---- common options
    for opt, bad, exc in (("ignore_index", -100.0, TypeError), ("ignore_index", "x", TypeError),
                          ("temperature", 0.0, ValueError), ("temperature", math.nan, ValueError),
                          ("temperature", math.inf, ValueError), ("temperature", "1", TypeError),
                          ("temperature", True, TypeError), ("softcap", -1.0, ValueError), ("softcap", math.nan, ValueError),
                          ("reduction", "avg", ValueError), ("backend", "numpy", ValueError)):
        case(f"{name}-{opt}-{bad!r}", lambda t, c=c, opt=opt, bad=bad: c(t, **{opt: bad}), Raises(exc, opt))
    case(f"{name}-ignore_index-2**70", lambda t, c=c: c(t, ignore_index=2**70), Raises(ValueError, "ignore_index"))
    if name in METRICS:
        case(f"{name}-return_metrics-str", lambda t, c=c: c(t, return_metrics="yes"), Raises(TypeError, "return_metrics"))
    # ---- values
    o = oracle_of(name)
    case(f"{name}-oracle", lambda t, name=name: call(name, t, metrics=True), Oracle(o))
    case(f"{name}-bias-oracle", lambda t, name=name: call(name, _with(t, b=t["bias"])),
         Oracle(lambda t, o=o: o(_with(t, b=t["bias"]))))
    case(f"{name}-extreme-logits", lambda t, name=name: call(name, _with(t, h=t["h"] * 1e3), metrics=True),
         Oracle(lambda t, o=o: o(_with(t, h=t["h"] * 1e3)), rtol=1e-7))
    case(f"{name}-noncontiguous", lambda t, name=name: call(
        name, _with(t, h=t["h"].transpose(0, 1).contiguous().transpose(0, 1), w=t["w"].T.contiguous().T)),
        Same(lambda t, name=name: call(name, t)))
    case(f"{name}-stride0-weight", lambda t, name=name: call(name, _with(t, w=t["w"][:1].expand(V, D))),
         Same(lambda t, name=name: call(name, _with(t, w=t["w"][:1].expand(V, D).contiguous()))))
    case(f"{name}-no_grad", lambda t, name=name: _in(torch.no_grad, lambda: call(name, t, metrics=True)),
         Same(lambda t, name=name: call(name, t, metrics=True)))
    case(f"{name}-inference_mode", lambda t, name=name: _in(torch.inference_mode, lambda: call(name, t)),
         Same(lambda t, name=name: call(name, t)))
    case(f"{name}-nan-hidden", lambda t, name=name: call(name, _with(t, h=t["h"].index_fill(1, torch.tensor([2]),
                                                                                             math.nan))), IsNaN())
    case(f"{name}-all-ignored", lambda t, name=name: call(name, _with(t, y=torch.full_like(t["y"], -100)),
                                                          metrics=True), Finite(zero_grad=name != "preference_distillation_loss"))
    # (policy_kl_loss here uses only linear_divergence, whose backward already runs under autocast)
    case(f"{name}-autocast-bf16", lambda t, name=name: _autocast(name, t), Finite())


def _in(ctx, fn):
    with ctx():
        return fn()


def _autocast(name, t):
    t = _with(t, h=t["h"].float().requires_grad_(), w=t["w"].float(), rh=t["rh"].float(), rw=t["rw"].float(),
              bias=t["bias"].float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _scalar(call(name, t))
        loss.backward()
    return loss.detach()


def _empty(name):
    def thunk(gen_t):
        t = make(torch.Generator().manual_seed(0), b=0)
        if name == "reverse_kl_loss":
            return call(name, t, metrics=True, num_samples_per_prompt=1)
        return call(name, t, metrics=True)
    return thunk


for name in LOSSES:
    case(f"{name}-empty-batch", _empty(name), Finite(value=0.0))

# ---- the losses' own tensor options: list, wrong shape, wrong dtype, another device
TENSOR_OPTIONS = [
    ("dpo_loss", "ref_hidden", "rh", "float"), ("dpo_loss", "ref_weight", "rw", "float"),
    ("pmle_loss", "ref_hidden", "rh", "float"), ("reverse_kl_loss", "rewards", "rewards", "float"),
    ("reverse_kl_loss", "old_logps", "old", "float"), ("reverse_kl_loss", "ref_hidden", "rh", "float"),
    ("preference_distillation_loss", "reward_a", "pa", "float"), ("preference_distillation_loss", "reward_b", "pb", "float"),
    ("kto_loss", "desirable", "des", "flag"), ("kto_loss", "ref_weight", "rw", "float"), ("npo_loss", "ref_hidden", "rh", "float"),
    ("policy_kl_loss", "ref_hidden", "rh", "float"),
]


def _opt(name, key, value_fn, drop=()):
    def thunk(t):
        kw = {key: value_fn(t)}
        return call(name, t, **kw, **{d: None for d in drop})
    return thunk


for name, key, src, kind in TENSOR_OPTIONS:
    case(f"{name}-{key}-list", _opt(name, key, lambda t, s=src: t[s].tolist()), Raises(TypeError, key))
    case(f"{name}-{key}-shape", _opt(name, key, lambda t, s=src: t[s][:-1]), Raises(ValueError, key))
    case(f"{name}-{key}-meta", _opt(name, key, lambda t, s=src: t[s].to(META)), Raises(ValueError, key))
    bad_dtype = (lambda t, s=src: t[s].long()) if kind == "float" else (lambda t, s=src: t[s].double())
    case(f"{name}-{key}-dtype", _opt(name, key, bad_dtype), Raises(TypeError, key))
for name, key, kw in (
    ("dpo_loss", "ref_chosen_logps", lambda t: dict(ref_chosen_logps=t["pa"][:1], ref_rejected_logps=t["pb"])),
    ("dpo_loss", "ref_chosen_logps", lambda t: dict(ref_chosen_logps=t["pa"].to(META), ref_rejected_logps=t["pb"])),
    ("dpo_loss", "ref_rejected_logps", lambda t: dict(ref_chosen_logps=t["pa"], ref_rejected_logps=t["pb"].tolist())),
    ("dpo_loss", "ref_chosen_logps", lambda t: dict(ref_chosen_logps=t["pa"][:, None], ref_rejected_logps=t["pb"])),
    ("pmle_loss", "ref_logps", lambda t: dict(kl_estimator="sampled", ref_logps=t["pre"].to(META))),
    ("pmle_loss", "ref_logps", lambda t: dict(kl_estimator="sampled", ref_logps=t["pre"][:1])),
    ("preference_distillation_loss", "target_prob", lambda t: dict(reward_a=None, reward_b=None, target_prob=t["prob"][:1])),
    ("preference_distillation_loss", "target_prob", lambda t: dict(reward_a=None, reward_b=None,
                                                                   target_prob=t["prob"][:, None])),
    ("preference_distillation_loss", "reward_a", lambda t: dict(reward_a=t["pa"][:1])),
    ("kto_loss", "kl_logps", lambda t: dict(kl_logps=t["pre"].to(META), ref_kl_logps=t["pre"])),
    ("kto_loss", "kl_logps", lambda t: dict(kl_logps=t["pre"][:, None], ref_kl_logps=t["pre"])),
    ("kto_loss", "ref_kl_logps", lambda t: dict(kl_logps=t["pre"], ref_kl_logps=t["pre"][:-1])),
    ("kto_loss", "ref_kl_logps", lambda t: dict(kl_logps=t["pre"])),
    ("reverse_kl_loss", "rewards", lambda t: dict(rewards=t["rewards"][:1])),
    ("orpo_loss", "nll_labels", lambda t: dict(nll_labels=t["y"])),
    ("orpo_loss", "nll_labels", lambda t: dict(nll_labels=t["y"][:P].to(META))),
    ("orpo_loss", "nll_labels", lambda t: dict(nll_labels=t["y"][:P].double())),
    ("dpo_loss", "ref_hidden", lambda t: dict(ref_hidden=t["rh"].to(META))),
    ("dpo_loss", "ref_bias", lambda t: dict(ref_bias=t["bias"][:-1])),
    ("dpo_loss", "ref_weight", lambda t: dict(ref_weight=t["rw"][:-1])),
    ("pmle_loss", "ref_hidden", lambda t: dict(ref_hidden=t["rh"].to(META))),
    ("policy_kl_loss", "ref_hidden", lambda t: dict(ref_hidden=t["rh"][:, :-1])),
    ("policy_kl_loss", "ref_weight", lambda t: dict(ref_weight=t["rw"].to(META))),
):
    case(f"{name}-{key}-bad-{len(CASES)}", lambda t, name=name, kw=kw: call(name, t, **kw(t)), Raises((TypeError, ValueError), key))

# ---- hyper-parameters (non-finite, out of range, wrong type, unknown choices, unused but invalid)
HYPER = [
    ("dpo_loss", "beta", [0.0, -1.0, math.nan, math.inf, "0.1"]),
    ("dpo_loss", "label_smoothing", [0.5, -0.1, math.nan]),
    ("dpo_loss", "loss_type", ["kto", 3, [], ["sigmoid", "bogus"]]),
    ("dpo_loss", "loss_weights", [[1.0, 2.0], [math.nan], 1.0]),
    ("dpo_loss", "f_divergence", ["tv"]),
    ("dpo_loss", "f_alpha", [math.nan, math.inf]),
    ("dpo_loss", "discopop_tau", [0.0, math.nan]),
    ("dpo_loss", "rpo_alpha", [-1.0, math.nan]),
    ("dpo_loss", "ld_alpha", [1.5, -0.1, math.nan]),
    ("dpo_loss", "wpo_max", [0.0, math.inf]),
    ("dpo_loss", "use_weighting", ["yes"]),
    ("dpo_loss", "reference_free", [True, 1]),
    ("pmle_loss", "gamma", [0.0, math.nan, -1.0]),
    ("pmle_loss", "beta", [-1.0, math.inf]),
    ("pmle_loss", "kl_estimator", ["exact"]),
    ("preference_distillation_loss", "gamma", [0.0, math.nan]),
    ("reverse_kl_loss", "beta", [-1.0, math.nan]),
    ("reverse_kl_loss", "gamma", [-0.1, math.inf]),
    ("reverse_kl_loss", "num_samples_per_prompt", [0, 3, 2.0]),
    ("reverse_kl_loss", "clip_eps", [0.0, 1.0, math.nan]),
    ("reverse_kl_loss", "entropy", ["bits"]),
    ("reverse_kl_loss", "kl_estimator", ["exact"]),
    ("policy_kl_loss", "estimator", ["exact"]),
    ("policy_kl_loss", "num_samples_per_prompt", [0, 3]),
    ("simpo_loss", "beta", [0.0, math.nan]),
    ("simpo_loss", "gamma_margin", [math.nan, math.inf]),
    ("simpo_loss", "label_smoothing", [0.5]),
    ("simpo_loss", "nll_weight", [-1.0, math.nan]),
    ("simpo_loss", "nll_average", ["batch"]),
    ("cpo_loss", "beta", [0.0]),
    ("cpo_loss", "loss_type", ["kto_pair"]),
    ("cpo_loss", "simpo_gamma", [math.nan]),
    ("cpo_loss", "alphapo_alpha", [math.inf]),
    ("cpo_loss", "cpo_alpha", [-0.5, math.nan]),
    ("cpo_loss", "nll_average", ["mean"]),
    ("orpo_loss", "beta", [0.0, math.nan, -1.0]),
    ("orpo_loss", "nll_average", ["x"]),
    ("kto_loss", "beta", [0.0, math.nan]),
    ("kto_loss", "loss_type", ["bco"]),
    ("kto_loss", "desirable_weight", [-1.0, math.nan]),
    ("kto_loss", "undesirable_weight", [math.inf]),
    ("kto_loss", "batch_kl", ["yes"]),
    ("npo_loss", "beta", [0.0, -2.0, math.nan]),
    ("nll_loss", "num_items_in_batch", [0, 2.5]),
]
for name, key, bads in HYPER:
    for bad in bads:
        kw = {key: bad}
        if name == "dpo_loss" and key == "rpo_alpha":
            kw = dict(rpo_alpha=bad)
        expect = Raises((TypeError, ValueError), key)
        case(f"{name}-{key}-{bad!r}", lambda t, name=name, kw=kw: call(name, t, **kw), expect)
# options that interact
for cid, name, kw, key in (
    ("dpo-fdiv-nca", "dpo_loss", dict(loss_type="nca_pair", f_divergence="forward_kl"), "f_divergence"),
    ("dpo-fdiv-apo_down", "dpo_loss", dict(loss_type="apo_down", f_divergence="js_divergence"), "f_divergence"),
    ("dpo-fdiv-aot", "dpo_loss", dict(loss_type="aot", f_divergence="alpha_divergence"), "f_divergence"),
    ("dpo-fdiv-list", "dpo_loss", dict(loss_type=["sigmoid", "bco_pair"], f_divergence="forward_kl"), "f_divergence"),
    ("dpo-exo-eps0", "dpo_loss", dict(loss_type="exo_pair"), "label_smoothing"),
    ("dpo-wpo-aot", "dpo_loss", dict(loss_type="aot", use_weighting=True), "use_weighting"),
    ("dpo-rpo-and-sft", "dpo_loss", dict(loss_type=["sigmoid", "sft"], rpo_alpha=0.5), "rpo_alpha"),
    ("dpo-no-ref", "dpo_loss", dict(ref_hidden=None, ref_weight=None), "ref_chosen_logps"),
    ("dpo-two-refs", "dpo_loss", dict(ref_chosen_logps=torch.zeros(P, dtype=F64), ref_rejected_logps=torch.zeros(P, dtype=F64)),
     "ref_chosen_logps"),
    ("dpo-ref-half", "dpo_loss", dict(ref_hidden=None), "ref_weight"),
    ("pmle-beta0-exact", "pmle_loss", dict(beta=0.0, kl_estimator="exact"), "kl_estimator"),
    ("pmle-token-exact-ref-logps", "pmle_loss", dict(ref_hidden=None, ref_weight=None, ref_logps=torch.zeros(B, dtype=F64)),
     "ref_logps"),
    ("pmle-no-ref", "pmle_loss", dict(ref_hidden=None, ref_weight=None), "ref_hidden"),
    ("pd-both-targets", "preference_distillation_loss", dict(target_prob=torch.full((P,), 0.5, dtype=F64)), "target_prob"),
    ("pd-no-target", "preference_distillation_loss", dict(reward_a=None, reward_b=None), "target_prob"),
    ("pd-half-rewards", "preference_distillation_loss", dict(reward_b=None), "reward_b"),
    ("rkl-no-ref", "reverse_kl_loss", dict(ref_hidden=None, ref_weight=None), "ref_logps"),
    ("rkl-token-exact-no-head", "reverse_kl_loss", dict(ref_hidden=None, ref_weight=None, kl_estimator="token_exact",
                                                        ref_logps=torch.zeros(B, dtype=F64)), "ref_logps"),
    ("kto-kl-and-batch", "kto_loss", dict(kl_logps=torch.zeros(3, dtype=F64), ref_kl_logps=torch.zeros(3, dtype=F64),
                                          batch_kl=True), "batch_kl"),
    ("kto-apo-with-kl", "kto_loss", dict(loss_type="apo_zero_unpaired", kl_logps=torch.zeros(3, dtype=F64),
                                         ref_kl_logps=torch.zeros(3, dtype=F64)), "kl_logps"),
    ("kto-no-desirable", "kto_loss", dict(desirable=None), "desirable"),
    ("npo-no-ref", "npo_loss", dict(ref_hidden=None, ref_weight=None), "ref_logps"),
):
    case(f"{cid}", lambda t, name=name, kw=kw: call(name, t, **kw), Raises((TypeError, ValueError), key))


# ---- edge values the issue names: NaN-free where the inputs are valid
def _orpo_case(mod):
    def thunk(t):
        t = mod(dict(t))
        return call("orpo_loss", t, metrics=True)
    return thunk


def _all_ignored_pair(t):
    y = t["y"].clone()
    y[0], y[P] = -100, -100
    return _with(t, y=y)


def _all_ignored_rejected(t):
    y = t["y"].clone()
    y[P] = -100
    return _with(t, y=y)


def _certain_chosen(t):
    """Row 0's tokens are certain (log-prob exactly 0 in float64): its logit exceeds the others by 1e3."""
    w = torch.zeros(V, D, dtype=F64)
    w[3, 0] = 1.0
    h = t["h"].clone()
    h[0, :, 0] = 1e3
    y = t["y"].clone()
    y[0] = torch.where(y[0] == -100, y[0], torch.full_like(y[0], 3))
    return _with(t, h=h, w=w + 1e-3 * t["w"], y=y)


case("orpo-all-ignored-pair", _orpo_case(_all_ignored_pair), Oracle(lambda t: oracle.orpo(
    _all_ignored_pair(t)["h"], t["w"], _all_ignored_pair(t)["y"])))
case("orpo-all-ignored-rejected", _orpo_case(_all_ignored_rejected), Oracle(lambda t: oracle.orpo(
    t["h"], t["w"], _all_ignored_rejected(t)["y"])))
case("orpo-mean-logp-exactly-0", _orpo_case(_certain_chosen), Finite())
case("orpo-V1", lambda t: fp.orpo_loss(t["h"], t["w"][:1], torch.where(t["y"] == -100, t["y"], 0), return_metrics=True,
                                        backend="torch"), Finite(zero_grad=True))
case("discopop-very-negative-fp32", lambda t: fp.objectives.dpo(
    torch.tensor([-2000.0, -5.0]), torch.tensor([0.0, -6.0]), beta=0.1, loss_type="discopop"),
    Finite())
case("rkl-empty-metrics", lambda t: fp.reverse_kl_loss(
    t["h"][:0], t["w"], t["y"][:0], rewards=t["rewards"][:0], beta=0.0, gamma=0.1, num_samples_per_prompt=1,
    return_metrics=True, backend="torch"), Finite(value=0.0))
case("distill-labels-none-mean", lambda t: fp.distill_loss(t["h"], t["w"], t["rh"], t["rw"], backend="torch"),
     Oracle(lambda t: oracle.distill(t["h"], t["w"], t["rh"], t["rw"])))


# ----------------------------------------------------------------------------- distill_loss

def dcall(t, **over):
    return fp.distill_loss(t["h"], t["w"], t["rh"], t["rw"], t["y"], backend="torch", **over)


for cid, mod, exc, key in (
    ("student-list", lambda t: _with(t, h=t["h"].tolist()), TypeError, "student_hidden"),
    ("teacher-list", lambda t: _with(t, rh=t["rh"].tolist()), TypeError, "teacher_hidden"),
    ("teacher-meta", lambda t: _with(t, rh=t["rh"].to(META)), ValueError, "teacher_hidden"),
    ("teacher-weight-meta", lambda t: _with(t, rw=t["rw"].to(META)), ValueError, "teacher_weight"),
    ("teacher-vocab", lambda t: _with(t, rw=t["rw"][:-1]), ValueError, "teacher_weight"),
    ("teacher-rows", lambda t: _with(t, rh=t["rh"][:-1]), ValueError, "teacher_hidden"),
    ("student-weight-dtype", lambda t: _with(t, w=t["w"].float()), TypeError, "student_weight"),
    ("labels-shape", lambda t: _with(t, y=t["y"][:, :-1]), ValueError, "labels"),
    ("labels-float", lambda t: _with(t, y=t["y"].double()), TypeError, "labels"),
    ("labels-meta", lambda t: _with(t, y=t["y"].to(META)), ValueError, "labels"),
    ("labels-minus1", lambda t: _with(t, y=t["y"].masked_fill(t["y"] == -100, -1)), ValueError, "labels"),
    ("labels-V", lambda t: _with(t, y=t["y"].clamp(min=0) + V), ValueError, "labels"),
):
    case(f"distill_loss-{cid}", lambda t, mod=mod: dcall(mod(t)), Raises(exc, key))
for key, bads in (("kind", ["tv"]), ("beta", [1.5, math.nan]), ("temperature", [0.0, math.inf]),
                  ("hard_weight", [-1.0, math.nan]), ("soft_weight", [math.inf]), ("num_items_in_batch", [0, 1.5]),
                  ("reduction", ["avg"]), ("student_softcap", [0.0]), ("teacher_softcap", [math.nan]),
                  ("ignore_index", [1.0]), ("backend", ["jax"])):
    for bad in bads:
        case(f"distill_loss-{key}-{bad!r}", lambda t, key=key, bad=bad: dcall(t, **{key: bad}),
             Raises((TypeError, ValueError), key))
case("distill_loss-student_bias-meta", lambda t: dcall(t, student_bias=t["bias"].to(META)), Raises(ValueError, "student_bias"))
case("distill_loss-teacher_bias-shape", lambda t: dcall(t, teacher_bias=t["bias"][:-1]), Raises(ValueError, "teacher_bias"))
case("distill_loss-hard-without-labels", lambda t: fp.distill_loss(t["h"], t["w"], t["rh"], t["rw"], hard_weight=0.5),
     Raises(ValueError, "labels"))
for kind in ("forward_kl", "reverse_kl", "jsd"):
    case(f"distill_loss-{kind}-oracle", lambda t, kind=kind: dcall(t, kind=kind, beta=0.3, hard_weight=0.2),
         Oracle(lambda t, kind=kind: oracle.distill(t["h"], t["w"], t["rh"], t["rw"], t["y"], kind=kind, beta=0.3,
                                                   hard_weight=0.2).sum() / (t["y"] != -100).sum()))
    case(f"distill_loss-{kind}-extreme", lambda t, kind=kind: dcall(_with(t, h=t["h"] * 1e3, rh=t["rh"] * 1e3), kind=kind),
         Oracle(lambda t, kind=kind: oracle.distill(t["h"] * 1e3, t["w"], t["rh"] * 1e3, t["rw"], t["y"], kind=kind).sum()
                / (t["y"] != -100).sum(), rtol=1e-7))
case("distill_loss-all-ignored", lambda t: dcall(_with(t, y=torch.full_like(t["y"], -100)), hard_weight=0.5),
     Finite(value=0.0, zero_grad=True))
case("distill_loss-empty", lambda t: dcall(_with(t, h=t["h"][:0], rh=t["rh"][:0], y=t["y"][:0])), Finite(value=0.0))
case("distill_loss-noncontiguous", lambda t: dcall(_with(t, rh=t["rh"].transpose(0, 1).contiguous().transpose(0, 1))),
     Same(lambda t: dcall(t)))
case("distill_loss-inference_mode", lambda t: _in(torch.inference_mode, lambda: dcall(t)), Same(lambda t: dcall(t)))
for dt in INT_WIDTHS:
    case(f"distill_loss-labels-{str(dt)[6:]}", lambda t, dt=dt: dcall(_wide(t, dt)),
         Same(lambda t, dt=dt: dcall(_wide(t, dt, plain=True))))


# ----------------------------------------------------------------------------- module twins

TWINS = {
    "DPOLoss": (fp.DPOLoss, "dpo_loss", dict(beta=0.2)), "PMLELoss": (fp.PMLELoss, "pmle_loss", dict(gamma=0.5)),
    "PreferenceDistillationLoss": (fp.PreferenceDistillationLoss, "preference_distillation_loss", dict(gamma=0.3)),
    "ReverseKLLoss": (fp.ReverseKLLoss, "reverse_kl_loss", dict(beta=0.1, gamma=0.05, num_samples_per_prompt=2)),
    "PolicyKLLoss": (fp.PolicyKLLoss, "policy_kl_loss", dict(estimator="token_exact")),
    "SimPOLoss": (fp.SimPOLoss, "simpo_loss", dict(beta=2.0)), "CPOLoss": (fp.CPOLoss, "cpo_loss", dict(beta=0.2)),
    "ORPOLoss": (fp.ORPOLoss, "orpo_loss", dict(beta=0.2)), "KTOLoss": (fp.KTOLoss, "kto_loss", dict(beta=0.2)),
    "NPOLoss": (fp.NPOLoss, "npo_loss", dict(beta=0.2)), "NLLLoss": (fp.NLLLoss, "nll_loss", dict()),
}
_HYPER_KEYS = {"beta", "gamma", "num_samples_per_prompt", "estimator"}


def _twin_tensors(name, t):
    return {k: v for k, v in LOSSES[name][2](t).items() if k not in _HYPER_KEYS}


def _twin_call(twin_cls, name, opts, t):
    return twin_cls(backend="torch", **opts)(t["h"], t["w"], t["y"], None, **_twin_tensors(name, t))


for tname, (cls, name, opts) in TWINS.items():
    case(f"{tname}-value", lambda t, cls=cls, name=name, opts=opts: _twin_call(cls, name, opts, t),
         Oracle(lambda t, name=name, opts=opts: oracle_of(name, base_kw=False, **_twin_tensors(name, t), **opts)(t)))
    case(f"{tname}-unknown-option", lambda t, cls=cls: cls(betta=0.1), Raises(TypeError, "betta"))
    case(f"{tname}-labels-float", lambda t, cls=cls, name=name, opts=opts: _twin_call(cls, name, opts, _with(t, y=t["y"].double())),
         Raises(TypeError, "labels"))
    case(f"{tname}-weight-meta", lambda t, cls=cls, name=name, opts=opts: _twin_call(cls, name, opts, _with(t, w=t["w"].to(META))),
         Raises(ValueError, "weight"))
case("DistillLoss-value", lambda t: fp.DistillLoss(kind="jsd", beta=0.3)(t["h"], t["w"], t["rh"], t["rw"], t["y"]),
     Oracle(lambda t: oracle.distill(t["h"], t["w"], t["rh"], t["rw"], t["y"], kind="jsd", beta=0.3).sum()
            / (t["y"] != -100).sum()))
case("DistillLoss-unknown-option", lambda t: fp.DistillLoss(temprature=2.0), Raises(TypeError, "temprature"))
case("DistillLoss-kind", lambda t: fp.DistillLoss(kind="tv")(t["h"], t["w"], t["rh"], t["rw"], t["y"]), Raises(ValueError, "kind"))


# ----------------------------------------------------------------------------- objectives

def _lp(t, n=P):
    return t["pa"][:n], t["pb"][:n]


OBJECTIVES = {
    "dpo": (obj.dpo, lambda t: (t["pa"], t["pb"], t["pa"] - 1.0, t["pb"] + 1.0), dict(beta=0.2),
            ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")),
    "pmle": (obj.pmle, lambda t: (t["pa"], t["pb"]), dict(gamma=0.5), ("logps_a", "logps_b")),
    "preference_distillation": (obj.preference_distillation, lambda t: (t["pa"], t["pb"]),
                                dict(gamma=0.5, target_prob=None), ("logps_a", "logps_b")),
    "reverse_kl": (obj.reverse_kl, lambda t: (t["pre"], t["rewards"], t["old"]),
                   dict(beta=0.1, gamma=0.01, num_samples_per_prompt=2), ("logps", "rewards", "ref_logps")),
    "sampled_kl": (obj.sampled_kl, lambda t: (t["pre"], t["old"]), dict(num_samples_per_prompt=2), ("logps", "ref_logps")),
    "simpo": (obj.simpo, lambda t: (t["pa"], t["pb"], torch.tensor([3, 4]), torch.tensor([2, 5])), dict(),
              ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths")),
    "cpo": (obj.cpo, lambda t: (t["pa"], t["pb"], torch.tensor([3, 4]), torch.tensor([2, 5])), dict(loss_type="simpo"),
            ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths")),
    "orpo": (obj.orpo, lambda t: (t["pa"], t["pb"], torch.tensor([3, 4]), torch.tensor([2, 5])), dict(),
             ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths")),
    "kto": (obj.kto, lambda t: (t["pre"], t["old"], t["des"]), dict(), ("logps", "ref_logps", "desirable")),
    "npo": (obj.npo, lambda t: (t["pre"], t["old"]), dict(), ("logps", "ref_logps")),
}


def _objective(fn, args, kw, i=None, change=None):
    args = list(args)
    if i is not None:
        args[i] = change(args[i])
    return fn(*args, **kw)


for oname, (fn, args, kw, names) in OBJECTIVES.items():
    if oname == "preference_distillation":
        kw = dict(kw, target_prob=None)
    for i, arg in enumerate(names):
        for how, change, exc in (("list", lambda x: x.tolist(), TypeError), ("column", lambda x: x[:, None], ValueError),
                                 ("len1", lambda x: x[:1], ValueError), ("meta", lambda x: x.to(META), ValueError)):
            if i == 0 and how in ("len1",):
                continue  # the first tensor sets the batch size
            if i == 0 and how == "meta":
                continue  # (the others are then on another device: their names are reported)
            case(f"objectives.{oname}-{arg}-{how}",
                 lambda t, fn=fn, args=args, kw=kw, i=i, change=change, oname=oname: _objective(
                     fn, args(t), _pd(oname, kw, t), i, change), Raises(exc, arg))
    case(f"objectives.{oname}-empty", lambda t, fn=fn, args=args, kw=kw, oname=oname: _objective(
        fn, [a[:0] for a in args(t)], _pd(oname, kw, t, 0)), Finite())


def _pd(oname, kw, t, n=P):
    if oname == "preference_distillation":
        return dict(kw, target_prob=t["prob"][:n])
    if oname == "reverse_kl" and n == 0:
        return dict(kw, num_samples_per_prompt=1)
    if oname == "sampled_kl" and n == 0:
        return dict(kw, num_samples_per_prompt=1)
    return kw


case("objectives.dpo-(3,1)-vs-(3,)", lambda t: obj.dpo(torch.zeros(3, 1), torch.zeros(3)), Raises(ValueError, "chosen_logps"))
case("objectives.dpo-ref-(1,)", lambda t: obj.dpo(torch.zeros(3), torch.zeros(3), torch.zeros(1), torch.zeros(3)),
     Raises(ValueError, "ref_chosen_logps"))
case("objectives.dpo-lists", lambda t: obj.dpo([0.0, 1.0], [1.0, 0.0]), Raises(TypeError, "chosen_logps"))
case("objectives.dpo-int-logps", lambda t: obj.dpo(torch.zeros(3, dtype=torch.long), torch.zeros(3)),
     Raises(TypeError, "chosen_logps"))
case("objectives.dpo-sft-no-lengths", lambda t: obj.dpo(t["pa"], t["pb"], loss_type="sft"), Raises(ValueError, "chosen_lengths"))
case("objectives.dpo-ipo-no-lengths", lambda t: obj.dpo(t["pa"], t["pb"], loss_type="ipo"), Raises(ValueError, "chosen_lengths"))
case("objectives.dpo-half-ref", lambda t: obj.dpo(t["pa"], t["pb"], t["pa"]), Raises(ValueError, "ref_rejected_logps"))
case("objectives.dpo-beta-nan", lambda t: obj.dpo(t["pa"], t["pb"], beta=math.nan), Raises(ValueError, "beta"))
case("objectives.dpo-discopop-extreme", lambda t: obj.dpo(t["pa"].float() - 1e4, t["pb"].float(), loss_type="discopop"),
     Finite())
case("objectives.preference_distillation-reward_a-(1,)", lambda t: obj.preference_distillation(
    t["pa"], t["pb"], gamma=0.5, reward_a=t["pa"][:1], reward_b=t["pb"]), Raises(ValueError, "reward_a"))
case("objectives.preference_distillation-reward_b-meta", lambda t: obj.preference_distillation(
    t["pa"], t["pb"], gamma=0.5, reward_a=t["pa"], reward_b=t["pb"].to(META)), Raises(ValueError, "reward_b"))
case("objectives.reverse_kl-rewards-(1,)", lambda t: obj.reverse_kl(
    t["pre"], t["rewards"][:1], beta=0.0, gamma=0.1, num_samples_per_prompt=1), Raises(ValueError, "rewards"))
case("objectives.reverse_kl-old_logps-meta", lambda t: obj.reverse_kl(
    t["pre"], t["rewards"], beta=0.0, gamma=0.1, num_samples_per_prompt=1, old_logps=t["old"].to(META)),
    Raises(ValueError, "old_logps"))
case("objectives.reverse_kl-beta-no-ref", lambda t: obj.reverse_kl(
    t["pre"], t["rewards"], beta=0.1, gamma=0.1, num_samples_per_prompt=1), Raises(ValueError, "ref_logps"))
case("objectives.reverse_kl-clip_eps-unused-but-bad", lambda t: obj.reverse_kl(
    t["pre"], t["rewards"], beta=0.0, gamma=0.1, num_samples_per_prompt=1, clip_eps=2.0), Raises(ValueError, "clip_eps"))
case("objectives.sampled_kl-(4,)-(4,1)", lambda t: obj.sampled_kl(torch.zeros(4), torch.zeros(4, 1)),
     Raises(ValueError, "ref_logps"))
case("objectives.sampled_kl-k-not-divisor", lambda t: obj.sampled_kl(torch.zeros(4), torch.zeros(4), num_samples_per_prompt=3),
     Raises(ValueError, "num_samples_per_prompt"))
case("objectives.leave_one_out_baseline-B-not-divisible", lambda t: obj.leave_one_out_baseline(torch.zeros(5), 2),
     Raises(ValueError, "k"))
case("objectives.leave_one_out_baseline-k0", lambda t: obj.leave_one_out_baseline(torch.zeros(4), 0), Raises(ValueError, "k"))
case("objectives.leave_one_out_baseline-list", lambda t: obj.leave_one_out_baseline([1.0, 2.0], 2),
     Raises(TypeError, "values"))
case("objectives.kto-desirable-float", lambda t: obj.kto(t["pre"], t["old"], t["des"].double()), Raises(TypeError, "desirable"))
case("objectives.kto-kl-column", lambda t: obj.kto(t["pre"], t["old"], t["des"], kl_logps=t["pre"][:, None],
                                                   ref_kl_logps=t["pre"]), Raises(ValueError, "kl_logps"))
case("objectives.kto-kl-half", lambda t: obj.kto(t["pre"], t["old"], t["des"], kl_logps=t["pre"]),
     Raises(ValueError, "ref_kl_logps"))
case("objectives.cpo-ipo-no-rejected-lengths", lambda t: obj.cpo(t["pa"], t["pb"], torch.tensor([3, 4]), loss_type="ipo"),
     Raises(ValueError, "rejected_lengths"))
case("objectives.cpo-lengths-bool", lambda t: obj.cpo(t["pa"], t["pb"], torch.tensor([True, False])),
     Raises(TypeError, "chosen_lengths"))
case("objectives.f_divergence_score-list", lambda t: obj.f_divergence_score([0.1], "forward_kl"), Raises(TypeError, "rho"))
case("objectives.f_divergence_score-kind", lambda t: obj.f_divergence_score(t["pa"], "tv"), Raises(ValueError, "f_divergence"))
case("objectives.orpo-mean-exactly-0", lambda t: obj.orpo(torch.tensor([0.0, -1.0]), torch.tensor([-2.0, 0.0]),
                                                          torch.tensor([3, 4]), torch.tensor([2, 0])), Finite())


# ----------------------------------------------------------------------------- primitives

N = 6


def _flat(t):
    return t["h"].reshape(-1, D)[:N], t["w"], t["y"].reshape(-1)[:N].clamp(min=0)


def lp_call(t, **kw):
    h, w, y = t.get("fh"), t["w"], t.get("fy")
    return fp.linear_logprobs(h, w, y, backend="torch", **kw).sum()


def _prim(t):
    h, w, y = _flat(t)
    y = y.clone()
    y[1] = -100
    return _with(t, fh=h, fy=y)


PRIM = [
    ("linear_logprobs-labels-out-of-range", lambda t: lp_call(_with(_prim(t), fy=_prim(t)["fy"] + V)), Raises(ValueError, "labels")),
    ("linear_logprobs-weight-meta", lambda t: lp_call(_with(_prim(t), w=t["w"].to(META))), Raises(ValueError, "weight")),
    ("linear_logprobs-labels-meta", lambda t: lp_call(_with(_prim(t), fy=_prim(t)["fy"].to(META))), Raises(ValueError, "labels")),
    ("linear_logprobs-hidden-list", lambda t: fp.linear_logprobs(_prim(t)["fh"].tolist(), t["w"], _prim(t)["fy"]),
     Raises(TypeError, "hidden")),
    ("linear_logprobs-extreme", lambda t: lp_call(_with(_prim(t), fh=_prim(t)["fh"] * 1e4)),
     Oracle(lambda t: ref_prims.linear_logprobs(_prim(t)["fh"] * 1e4, t["w"], _prim(t)["fy"]).sum(), rtol=1e-7)),
    ("linear_logprobs-noncontiguous", lambda t: lp_call(_with(_prim(t), fh=_prim(t)["fh"].T.contiguous().T,
                                                              w=t["w"].T.contiguous().T)), Same(lambda t: lp_call(_prim(t)))),
    ("linear_logprobs-stride0-hidden", lambda t: lp_call(_with(_prim(t), fh=_prim(t)["fh"][:1].expand(N, D))),
     Same(lambda t: lp_call(_with(_prim(t), fh=_prim(t)["fh"][:1].expand(N, D).contiguous())))),
    ("linear_logprobs-empty", lambda t: fp.linear_logprobs(t["h"].reshape(-1, D)[:0], t["w"], torch.zeros(0, dtype=torch.long)).sum(),
     Finite(value=0.0)),
    ("linear_logprobs-all-ignored", lambda t: lp_call(_with(_prim(t), fy=torch.full((N,), -100))), Finite(value=0.0)),
    ("linear_logprobs-inference_mode", lambda t: _in(torch.inference_mode, lambda: lp_call(_prim(t))),
     Same(lambda t: lp_call(_prim(t)))),
    ("linear_logprobs-nan", lambda t: lp_call(_with(_prim(t), fh=_prim(t)["fh"].index_fill(0, torch.tensor([0]), math.nan))),
     IsNaN()),
    ("linear_logprobs-D0", lambda t: fp.linear_logprobs(torch.zeros(3, 0, dtype=F64), torch.zeros(V, 0, dtype=F64),
                                                        torch.tensor([0, 1, 2])).sum(),
     Finite(value=-3 * math.log(V))),
    ("linear_logprobs-ignore_index-2**70", lambda t: lp_call(_prim(t), ignore_index=2**70), Raises(ValueError, "ignore_index")),
    ("linear_logprobs-autocast-backward", lambda t: _autocast_prim(t), Finite()),
    ("sequence_logprobs-uint8-average", lambda t: fp.sequence_logprobs(
        t["h"], t["w"].repeat(10, 1)[:200], _uint8_156(t), average=True).sum(),
        Same(lambda t: fp.sequence_logprobs(t["h"], t["w"].repeat(10, 1)[:200], _uint8_156(_with(t, _u8=True)),
                                            average=True).sum())),
    ("linear_logprobs-uint8-156-out-of-range", lambda t: lp_call(_with(_prim(t), fy=_prim(t)["fy"].clamp(min=0).to(
        torch.uint8).index_fill(0, torch.tensor([2]), 156))), Raises(ValueError, "labels")),
    ("nll_loss-uint8-156-out-of-range", lambda t: fp.nll_loss(t["h"], t["w"], t["y"].clamp(min=0).to(torch.uint8).index_fill(
        1, torch.tensor([2]), 156)), Raises(ValueError, "labels")),
    ("sequence_logprobs-hidden-1d", lambda t: fp.sequence_logprobs(t["h"][0, 0], t["w"], t["y"][0, 0]), Raises(ValueError, "hidden")),
    ("linear_divergence-labels-minus1", lambda t: fp.linear_divergence(
        t["h"], t["w"], t["rh"], t["rw"], t["y"].masked_fill(t["y"] == -100, -1)).sum(), Raises(ValueError, "labels")),
    ("linear_divergence-teacher-meta", lambda t: fp.linear_divergence(t["h"], t["w"], t["rh"].to(META), t["rw"].to(META)),
     Raises(ValueError, "teacher_hidden")),
    ("linear_divergence-kind", lambda t: fp.linear_divergence(t["h"], t["w"], t["rh"], t["rw"], kind="tv"), Raises(ValueError, "kind")),
    ("linear_divergence-beta-nan", lambda t: fp.linear_divergence(t["h"], t["w"], t["rh"], t["rw"], kind="jsd", beta=math.nan),
     Raises(ValueError, "beta")),
    ("linear_divergence-jsd-extreme", lambda t: fp.linear_divergence(t["h"] * 1e3, t["w"], t["rh"] * 1e3, t["rw"],
                                                                     kind="jsd").sum(),
     Oracle(lambda t: ref_prims.linear_divergence(t["h"] * 1e3, t["w"], t["rh"] * 1e3, t["rw"], kind="jsd").sum(), rtol=1e-7)),
    ("reference-jsd-logits-1e4", lambda t: ref_prims.linear_divergence(
        torch.tensor([[1.0]], dtype=F64).requires_grad_(), torch.tensor([[1e4], [0.0]], dtype=F64),
        torch.tensor([[1.0]], dtype=F64), torch.tensor([[0.0], [1e4]], dtype=F64), kind="jsd").sum().detach(),
     Finite()),
    ("LinearLogprobs-value", lambda t: fp.LinearLogprobs(backend="torch")(_prim(t)["fh"], t["w"], _prim(t)["fy"]).sum(),
     Oracle(lambda t: ref_prims.linear_logprobs(_prim(t)["fh"], t["w"], _prim(t)["fy"]).sum())),
    ("LinearLogprobs-temperature", lambda t: fp.LinearLogprobs(temperature=-1.0)(_prim(t)["fh"], t["w"], _prim(t)["fy"]),
     Raises(ValueError, "temperature")),
    ("LinearDivergence-value", lambda t: fp.LinearDivergence(kind="reverse_kl", backend="torch")(
        t["h"], t["w"], t["rh"], t["rw"], t["y"]).sum(),
     Oracle(lambda t: ref_prims.linear_divergence(t["h"], t["w"], t["rh"], t["rw"], t["y"], kind="reverse_kl").sum())),
    ("LinearDivergence-kind", lambda t: fp.LinearDivergence(kind="x")(t["h"], t["w"], t["rh"], t["rw"]), Raises(ValueError, "kind")),
]
for cid, thunk, expect, *marks in PRIM:
    case(cid, thunk, expect, *marks)
for dt in INT_WIDTHS:
    case(f"linear_logprobs-labels-{str(dt)[6:]}", lambda t, dt=dt: lp_call(_rows(_wide(t, dt))),
         Same(lambda t, dt=dt: lp_call(_rows(_wide(t, dt, plain=True)))))


def _rows(t):
    return _with(t, fh=t["h"].reshape(-1, D), fy=t["y"].reshape(-1))


def _uint8_156(t):
    y = t["y"].clone().clamp(min=0)
    y[:, 1] = 156
    return y.to(torch.uint8) if not t.get("_u8") else y


def _autocast_prim(t):
    h = _prim(t)["fh"].float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp.linear_logprobs(h, t["w"].float(), _prim(t)["fy"], backend="torch").sum()
        out.backward()
    return out.detach()


# ----------------------------------------------------------------------------- configuration

case("set_workspace_bytes-small", lambda t: fp.set_workspace_bytes(1024), Raises(ValueError, "nbytes"))
case("set_workspace_bytes-float", lambda t: fp.set_workspace_bytes(2.0**20), Raises(ValueError, "nbytes"))
case("set_workspace_bytes-str", lambda t: fp.set_workspace_bytes("1GB"), Raises(ValueError, "nbytes"))
case("available_backends-str", lambda t: fp.available_backends("cpu") == fp.available_backends(torch.device("cpu")),
     Returns(True))
case("available_backends-int", lambda t: fp.available_backends(0), Raises(TypeError, "device"))


@pytest.mark.parametrize(("thunk", "expect"), CASES)
def test_battery(thunk, expect, gen):
    expect.check(thunk, make(gen))


def test_battery_size():
    """The battery is as broad as announced (guards against cases silently dropping out of the table)."""
    print(f"battery: {len(CASES)} cases")
    assert len(CASES) >= 600


def test_get_workspace_bytes_is_an_int():
    assert isinstance(fp.get_workspace_bytes(), int) and fp.get_workspace_bytes() >= 2**16


@pytest.mark.parametrize(("var", "value", "name"), [
    ("FASTPREF_WORKSPACE_MB", "lots", "FASTPREF_WORKSPACE_MB"),
    ("FASTPREF_BACKEND", "bogus", "backend"),
])
def test_environment_variables_are_named(var, value, name, request):
    """A bad setting fails with its name, at import or at the first call."""
    code = ("import torch, fastpref as fp; "
            "fp.linear_logprobs(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]))")
    env = dict(os.environ, **{var: value})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and name in out.stderr.splitlines()[-1], out.stderr[-500:]
