"""The chunked torch backend's own paths against the fp64 oracle (accuracy rule): large vocabularies,
tiles split over rows and vocabulary by a small workspace; gradcheck, invariants.  The cases every
backend shares are in tests/test_oracle.py."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_accurate, make_head, make_labels, settings

import fastpref as fp
from fastpref import reference as ref
from fastpref.backends import tiling

SMALL_WS = 2**20  # 1 MiB: 64k-element tiles, so V=32001 is split over rows and vocabulary

# (id, N, D, V, dtype, ignored fraction, bias, temperature, softcap, workspace)
LOGPROB_CASES = [
    ("V50257-fp32-ign20-bias", 24, 48, 50257, torch.float32, 0.2, True, 1.0, None, None),
    ("V50257-bf16-softcap30-temp0.8", 24, 48, 50257, torch.bfloat16, 0.2, False, 0.8, 30.0, None),
    ("V32001-fp32-vocab-chunked-softcap", 37, 40, 32001, torch.float32, 0.2, True, 1.2, 8.0, SMALL_WS),
    ("V32001-bf16-vocab-chunked", 37, 40, 32001, torch.bfloat16, 0.0, True, 1.0, None, SMALL_WS),
    ("V1000-fp32-row-chunked-T63", 63 * 3, 24, 1000, torch.float32, 0.2, False, 1.0, None, 2**16),
]


def _grads(out_terms, inputs):
    loss = sum(out_terms)
    return torch.autograd.grad(loss, [t for t in inputs if t is not None and t.requires_grad])


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("case", LOGPROB_CASES, ids=[c[0] for c in LOGPROB_CASES])
def test_logprobs_matches_oracle(case, with_entropy, gen, keep_logits):
    _, n, d, v, dtype, ignored, has_bias, temp, cap, ws = case
    h, w, b = make_head(n, d, v, dtype=dtype, bias=has_bias, gen=gen)
    labels = make_labels(n, v, ignored=ignored, gen=gen)
    g_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    kw = dict(temperature=temp, softcap=cap, return_entropy=True)

    def run(fn, cast, **extra):
        leaves = [None if t is None else cast(t).detach().requires_grad_() for t in (h, w, b)]
        lp, ent = fn(leaves[0], leaves[1], labels, leaves[2], **kw, **extra)
        terms = [(lp.double() * g_logp).sum()] + ([(ent.double() * g_ent).sum()] if with_entropy else [])
        return (lp, ent), _grads(terms, leaves)

    (t_lp, t_ent), t_grads = run(ref.linear_logprobs, lambda t: t.double(), precision="fp64")
    (n_lp, n_ent), n_grads = run(ref.linear_logprobs, lambda t: t, precision="native")
    with settings(workspace=ws):
        (o_lp, o_ent), o_grads = run(fp.linear_logprobs, lambda t: t, backend="torch")

    assert o_lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (o_lp[labels == -100] == 0).all() and (o_ent[labels == -100] == 0).all()
    assert_accurate("logp", o_lp, n_lp, t_lp, dtype)
    assert_accurate("entropy", o_ent, n_ent, t_ent, dtype)
    for name, o, nv, t in zip(("d_hidden", "d_weight", "d_bias"), o_grads, n_grads, t_grads):
        assert o.dtype == dtype, f"{name} dtype {o.dtype}"
        assert_accurate(name, o, nv, t, dtype)


DIV_CASES = [
    ("V50257-bf16-ign20", 16, 32, 48, 50257, torch.bfloat16, 0.2, True, 1.0, None, None),
    ("V32001-fp32-vocab-chunked", 21, 32, 16, 32001, torch.float32, 0.2, True, 1.3, 6.0, SMALL_WS),
]


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("case", DIV_CASES, ids=[c[0] for c in DIV_CASES])
def test_divergence_matches_oracle(case, kind, gen, keep_logits):
    _, n, ds, dt, v, dtype, ignored, has_bias, temp, cap, ws = case
    hs, ws_, bs = make_head(n, ds, v, dtype=dtype, bias=has_bias, gen=gen)
    ht, wt, bt = make_head(n, dt, v, dtype=dtype, bias=has_bias, gen=gen)
    labels = make_labels(n, v, ignored=ignored, gen=gen)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    kw = dict(kind=kind, beta=0.3, temperature=temp, student_softcap=cap, teacher_softcap=cap)

    def run(fn, cast, **extra):
        leaves = [None if t is None else cast(t).detach().requires_grad_() for t in (hs, ws_, bs)]
        c = lambda t: None if t is None else cast(t)  # noqa: E731
        div = fn(leaves[0], leaves[1], c(ht), c(wt), labels, student_bias=leaves[2], teacher_bias=c(bt), **kw, **extra)
        return div, _grads([(div.double() * g).sum()], leaves)

    t_div, t_grads = run(ref.linear_divergence, lambda t: t.double(), precision="fp64")
    n_div, n_grads = run(ref.linear_divergence, lambda t: t, precision="native")
    with settings(workspace=ws):
        o_div, o_grads = run(fp.linear_divergence, lambda t: t, backend="torch")
    assert (o_div[labels == -100] == 0).all()
    assert_accurate(kind, o_div, n_div, t_div, dtype)
    for name, o, nv, t in zip(("d_hidden", "d_weight", "d_bias"), o_grads, n_grads, t_grads):
        assert_accurate(name, o, nv, t, dtype)


# ------------------------------------------------------------------ gradcheck (fp64)


@pytest.mark.parametrize("ws", [None, 2**16], ids=["one-tile", "vocab-chunked"])
def test_gradcheck_logprobs(ws, gen, narrow_tiles, keep_logits):
    n, d, v = 16, 3, 300
    if ws:
        with settings(workspace=ws):
            assert tiling.plan_tiles(n, v, elem_bytes=8)[1] < v, "the case no longer splits the vocabulary"
    h, w, b = (t.requires_grad_() for t in make_head(n, d, v, dtype=torch.float64, bias=True, gen=gen))
    labels = make_labels(n, v, gen=gen)
    labels[1] = -100

    def f(h, w, b):
        return fp.linear_logprobs(h, w, labels, b, temperature=0.8, softcap=2.5, return_entropy=True, backend="torch")

    with settings(workspace=ws):
        assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_gradcheck_divergence(kind, gen, narrow_tiles, keep_logits):
    n, v = 16, 300
    with settings(workspace=2**16):
        assert tiling.plan_tiles(n, v, elem_bytes=8, heads=2)[1] < v, "the case no longer splits the vocabulary"
    hs, ws_, bs = (t.requires_grad_() for t in make_head(n, 5, v, dtype=torch.float64, bias=True, gen=gen))
    ht, wt, _ = make_head(n, 3, v, dtype=torch.float64, gen=gen)

    def f(hs, ws_, bs):
        return fp.linear_divergence(hs, ws_, ht, wt, student_bias=bs, kind=kind, beta=0.4, temperature=1.1,
                                    student_softcap=3.0, backend="torch")

    with settings(workspace=2**16):
        assert torch.autograd.gradcheck(f, (hs, ws_, bs), eps=1e-6, atol=1e-8)


def test_gradcheck_reference(gen):
    h, w, b = (t.requires_grad_() for t in make_head(4, 3, 7, dtype=torch.float64, bias=True, gen=gen))
    labels = make_labels(4, 7, gen=gen)
    f = lambda h, w, b: ref.linear_logprobs(h, w, labels, b, softcap=2.0, return_entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, w, b))


# ------------------------------------------------------------------ invariants


def test_shifting_every_logit_changes_nothing(gen):
    h, w, b = make_head(32, 16, 500, bias=True, gen=gen)
    labels = make_labels(32, 500, ignored=0.2, gen=gen)
    outs = []
    for shift in (0.0, 7.5):
        hh = h.clone().requires_grad_()
        lp, ent = fp.linear_logprobs(hh, w, labels, b + shift, return_entropy=True, backend="torch")
        (lp.sum() + ent.sum()).backward()
        outs.append((lp, ent, hh.grad))
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_teacher_equal_student_gives_zero(kind, gen):
    h, w, b = make_head(24, 16, 777, bias=True, gen=gen)
    hs, ws_ = h.clone().requires_grad_(), w.clone().requires_grad_()
    div = fp.linear_divergence(hs, ws_, h, w, student_bias=b, teacher_bias=b, kind=kind, backend="torch")
    div.sum().backward()
    assert div.abs().max() < 1e-6
    assert hs.grad.abs().max() < 1e-6 and ws_.grad.abs().max() < 1e-6


def test_divergences_are_nonnegative_and_jsd_endpoints(gen):
    hs, ws_, _ = make_head(16, 8, 200, gen=gen)
    ht, wt, _ = make_head(16, 8, 200, gen=gen)
    d = {k: fp.linear_divergence(hs, ws_, ht, wt, kind=k, backend="torch") for k in ("forward_kl", "reverse_kl")}
    assert (d["forward_kl"] > 0).all() and (d["reverse_kl"] > 0).all()
    j0 = fp.linear_divergence(hs, ws_, ht, wt, kind="jsd", beta=0.0, backend="torch")
    j1 = fp.linear_divergence(hs, ws_, ht, wt, kind="jsd", beta=1.0, backend="torch")
    torch.testing.assert_close(j0, d["forward_kl"])
    torch.testing.assert_close(j1, d["reverse_kl"])


# ------------------------------------------------------------------ gradients only where needed


class _OpSpy(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))


def test_frozen_head_gets_no_gradient_work(gen):
    h, w, b = make_head(16, 8, 100, bias=True, gen=gen)
    h.requires_grad_()
    labels = make_labels(16, 100, gen=gen)
    lp = fp.linear_logprobs(h, w, labels, b, backend="torch")
    with _OpSpy() as spy:
        lp.sum().backward()
    bwd = [args for name, args in spy.calls if "logprobs_bwd" in name]
    assert len(bwd) == 1
    need_hidden, need_weight, need_bias = bwd[0][-3:]
    assert (need_hidden, need_weight, need_bias) == (True, False, False)
    assert w.grad is None and b.grad is None and h.grad is not None


def test_sequence_logprobs_matches_oracle(gen):
    h, w, b = make_head(3 * 11, 8, 97, bias=True, gen=gen)
    h = h.reshape(3, 11, 8)
    labels = make_labels(33, 97, ignored=0.3, gen=gen).reshape(3, 11)
    labels[2] = -100
    for average in (False, True):
        hh = h.clone().requires_grad_()
        got = fp.sequence_logprobs(hh, w, labels, b, average=average, backend="torch")
        want = ref.sequence_logprobs(h.double(), w.double(), labels, b.double(), average=average)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        got.sum().backward()
        assert got[2] == 0 and (hh.grad[2] == 0).all()
