"""Triton backend under the interpreter (CPU), beyond the oracle cases every backend shares
(tests/test_oracle.py: every output and gradient against the fp64 oracle on both backward paths):
vocabulary slices merged by ``contract.merge_logprobs``, ``is_top1`` on exact ties, the logits cache
``[heads, N, V]`` against the logits, all rows ignored, bad labels, invariants, and the four registered ops
under ``opcheck`` (fake cache shapes included).

Shapes are small and odd on purpose (V = 123, 300 and 1000, D = 37, N = 96: partial row, vocabulary and
D tiles; two vocabulary splits per forward).
"""

import os
from dataclasses import replace

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("numpy")

import torch  # noqa: E402
from conftest import make_head, make_labels, settings  # noqa: E402

import fastpref  # noqa: E402
from fastpref import reference  # noqa: E402
from fastpref.backends import contract as C  # noqa: E402
from fastpref.backends.contract import (  # noqa: E402
    DivergenceOptions,
    Kind,
    LogprobsOptions,
    Transform,
    divergence_to_args,
    finish_divergence,
    finish_logprobs,
    logprobs_to_args,
)
from fastpref.primitives import logprobs_rows  # noqa: E402

try:
    from fastpref.kernels import _tiles
    from fastpref.kernels import linear_divergence as _div_kernels
    from fastpref.kernels import linear_logprobs as _lp_kernels
    from triton.runtime.interpreter import InterpretedFunction
except Exception as exc:  # pragma: no cover - reported as a skip reason
    pytest.skip(f"fastpref.kernels cannot be imported: {exc}", allow_module_level=True)
if not isinstance(_lp_kernels._logprobs_fwd_kernel, InterpretedFunction):
    pytest.skip(
        "fastpref.kernels was imported before TRITON_INTERPRET=1 was set (run this module in its own "
        "process)", allow_module_level=True,
    )

ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
GRAD_NAMES = ("d_hidden", "d_weight", "d_bias")


def _leaf(t, dtype, requires_grad=True):
    return None if t is None else t.detach().to(dtype).clone().requires_grad_(requires_grad)


def _grads(tensors):
    return [None if t is None else t.grad for t in tensors]


def _argmax_labels(labels, h, w, b, gen, share=0.3, **transform):
    """Set about ``share`` of the counted labels to their row's fp64 argmax, so ``is_top1`` is True there."""
    z = reference.materialize_logits(h.double(), w.double(), None if b is None else b.double(), **transform)
    pick = (torch.rand(labels.shape, generator=gen) < share) & (labels != -100)
    return torch.where(pick, z.argmax(-1), labels)


# --------------------------------------------------------------------------- linear_logprobs

def test_is_top1_is_the_first_argmax_on_exact_ties(gen):
    """Integer logits (exact in fp32 whatever the summation order) with many ties, on both vocabulary
    splits: True only when the label is the *first* argmax, as ``torch.argmax`` (the oracle) says."""
    n, d, vocab = 96, 6, 300  # two vocabulary tiles (256 columns) -> two splits, merged by LP_BEFORE's max
    h = torch.randint(-2, 3, (n, d), generator=gen).double()
    w = torch.randint(-1, 2, (vocab, d), generator=gen).double()
    z = h @ w.T
    top = z == z.amax(1, keepdim=True)
    first = top.float().argmax(1)
    last = vocab - 1 - top.flip(1).float().argmax(1)  # the last argmax: a tie if != first
    labels = torch.randint(0, vocab, (n,), generator=gen)
    kind = torch.arange(n) % 4
    labels = torch.where(kind == 0, first, torch.where(kind == 1, last, labels))
    labels[5] = -100
    assert (last[kind == 1] != first[kind == 1]).any(), "no tie among the rows that take the last argmax"
    assert (first[kind == 0] < 256).any() and (last[kind == 1] >= 256).any(), "ties do not cross the split"
    for dtype in (torch.float32, torch.bfloat16):  # small integers are exact in bf16 too
        out = fastpref.linear_logprobs(h.to(dtype), w.to(dtype), labels, outputs=("is_top1",), backend="triton")
        truth = reference.linear_logprobs(h, w, labels, outputs=("is_top1",))["is_top1"]
        assert torch.equal(out.is_top1, truth), f"{dtype}: is_top1 differs from the first argmax"
        assert truth[kind == 0].all() and not truth[5]
        assert not truth[(kind == 1) & (last != first)].any()


def test_vocabulary_slices_merge_to_the_whole(gen):
    """Two slices of the head (``vocab_start``), each giving partial statistics and this slice's
    ``d hidden``: merged / summed they equal the whole-vocabulary call, and the oracle."""
    n, d, vocab, cut = 96, 37, 300, 137
    h, w, b = make_head(n, d, vocab, dtype=torch.float32, bias=True, gen=gen)
    labels = _argmax_labels(make_labels(n, vocab, ignored=0.2, gen=gen), h, w, b, gen)
    opts = LogprobsOptions(entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True,
                           transform=Transform(0.9, 6.0, 1.2), vocab_size=vocab)
    ops = torch.ops.fastpref
    whole, _ = ops.logprobs_fwd(h, w, labels, b, *logprobs_to_args(opts), "triton")
    parts = []
    for v0, v1 in ((0, cut), (cut, vocab)):
        sl = replace(opts, vocab_start=v0)
        parts.append(ops.logprobs_fwd(h, w[v0:v1], labels, b[v0:v1], *logprobs_to_args(sl), "triton")[0])
    merged = C.merge_logprobs(torch.stack(parts))
    rows, rows_whole = finish_logprobs(merged, labels, opts), finish_logprobs(whole, labels, opts)
    for name in ("logp", "lse", "entropy", "log_sum_sq_probs", "mean_logits"):
        a, b_ = getattr(rows, name), getattr(rows_whole, name)
        assert (a - b_).abs().max() <= 1e-5 * (1 + b_.abs().max()), name
    assert torch.equal(rows.is_top1, rows_whole.is_top1)
    truth = reference.linear_logprobs(h.double(), w.double(), labels, b.double(), temperature=0.9, softcap=6.0,
                                      logit_scale=1.2, outputs=ALL_OUTPUTS)
    assert torch.equal(rows.is_top1, truth["is_top1"]) and truth["is_top1"].any()
    assert (rows.logp.double() - truth["logp"]).abs().max() < 1e-4

    # backward: the slices' d hidden add up, their d weight / d bias are the whole one's rows
    g, ge = C.mask_logprobs_grads(torch.randn(n, generator=gen), torch.randn(n, generator=gen), labels, opts)
    args = (g, ge, h, w, labels, b, rows.lse, rows.entropy, torch.empty(0))
    full = ops.logprobs_bwd(*args, *logprobs_to_args(opts), "triton", True, True, True)
    dh = torch.zeros_like(h)
    for v0, v1 in ((0, cut), (cut, vocab)):
        sl = replace(opts, vocab_start=v0)
        part = ops.logprobs_bwd(g, ge, h, w[v0:v1], labels, b[v0:v1], rows.lse, rows.entropy, torch.empty(0),
                                *logprobs_to_args(sl), "triton", True, True, True)
        dh += part[0]
        torch.testing.assert_close(part[1], full[1][v0:v1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(part[2], full[2][v0:v1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh, full[0], rtol=1e-5, atol=1e-5)


def test_logprobs_cache_is_the_logits_and_gives_the_same_gradients(gen):
    """With the cache the forward returns the fp32 logits ``[1, N, V]`` (the shape the fake kernel
    announces) and the backward reads them: the gradients equal the recomputing backward's."""
    n, d, vocab = 96, 37, 300
    h, w, b = make_head(n, d, vocab, dtype=torch.float32, bias=True, gen=gen)
    labels = make_labels(n, vocab, ignored=0.2, gen=gen)
    opts = LogprobsOptions(entropy=True, transform=Transform(0.8, 5.0, 1.3), vocab_size=vocab, cache=True)
    args = (h, w, labels, b, *logprobs_to_args(opts), "triton")
    with settings(keep_logits=True):
        stats, cache = torch.ops.fastpref.logprobs_fwd(*args)
        assert tuple(cache.shape) == _lp_kernels.logprobs_cache_shape(n, vocab, h.dtype, opts) == (1, n, vocab)
    z = reference.materialize_logits(h.double(), w.double(), b.double(), temperature=0.8, softcap=5.0, logit_scale=1.3)
    assert (cache[0].double() - z).abs().max() < 1e-5 * (1 + z.abs().max())
    with settings(keep_logits=False):
        stats_r, none = torch.ops.fastpref.logprobs_fwd(*args)
        assert none.numel() == 0
    with settings(workspace=2**16, keep_logits=True):  # 96 x 300 fp32 logits do not fit three quarters of 64 KiB
        assert torch.ops.fastpref.logprobs_fwd(*args)[1].numel() == 0
    torch.testing.assert_close(stats, stats_r, rtol=0, atol=0)
    rows = finish_logprobs(stats, labels, opts)
    g, ge = C.mask_logprobs_grads(torch.randn(n, generator=gen), torch.randn(n, generator=gen), labels, opts)
    bwd = (g, ge, h, w, labels, b, rows.lse, rows.entropy)
    from_cache = torch.ops.fastpref.logprobs_bwd(*bwd, cache, *logprobs_to_args(opts), "triton", True, True, True)
    recomputed = torch.ops.fastpref.logprobs_bwd(*bwd, none, *logprobs_to_args(opts), "triton", True, True, True)
    for name, a, r in zip(GRAD_NAMES, from_cache, recomputed):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_all_ignored_gives_zeros(gen, dtype):
    h0, w0, b0 = make_head(70, 37, 123, dtype=torch.float64, bias=True, gen=gen)
    h, w, b = _leaf(h0, dtype), _leaf(w0, dtype), _leaf(b0, dtype)
    labels = torch.full((70,), -100)
    lp, ent = fastpref.linear_logprobs(h, w, labels, b, return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    assert torch.all(lp == 0) and torch.all(ent == 0)
    for t in (h, w, b):
        assert t.grad is not None and torch.all(t.grad == 0)


def test_logprobs_bad_label_is_nan_not_oob(gen):
    """Labels outside [0, V) (validation bypassed: the unchecked internal call) give NaN, never a stray read."""
    h0, w0, _ = make_head(80, 37, 123, dtype=torch.float32, gen=gen)
    labels = make_labels(80, 123, gen=gen)
    labels[3], labels[40], labels[79] = 123, -5, 10**6
    out = logprobs_rows(h0, w0, labels, None, LogprobsOptions(entropy=True, is_top1=True), "triton")
    bad = torch.zeros(80, dtype=torch.bool)
    bad[[3, 40, 79]] = True
    assert torch.isnan(out.logp[bad]).all() and torch.isnan(out.entropy[bad]).all()
    assert not out.is_top1[bad].any()
    truth = reference.linear_logprobs(h0.double(), w0.double(), torch.where(bad, 0, labels))
    assert torch.isfinite(out.logp[~bad]).all() and (out.logp[~bad].double() - truth[~bad]).abs().max() < 1e-4


def test_logprobs_shift_invariance(gen):
    """A bias that adds the same constant to every logit changes nothing but the mean logit."""
    h0, w0, b0 = make_head(96, 37, 1000, dtype=torch.float32, bias=True, gen=gen)
    labels = make_labels(96, 1000, ignored=0.2, gen=gen)
    a = fastpref.linear_logprobs(h0, w0, labels, b0, outputs=ALL_OUTPUTS, backend="triton")
    b = fastpref.linear_logprobs(h0, w0, labels, b0 + 3.0, outputs=ALL_OUTPUTS, backend="triton")
    for name in ("logp", "entropy", "log_sum_sq_probs"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() < 1e-5, name
    keep = labels != -100
    assert ((b.mean_logits - a.mean_logits)[keep] - 3.0).abs().max() < 1e-5
    assert torch.equal(a.is_top1, b.is_top1)


# --------------------------------------------------------------------------- linear_divergence

@pytest.mark.parametrize("kind", list(Kind), ids=[k.name.lower() for k in Kind])
def test_divergence_cache_gives_the_same_results(gen, kind):
    """Both heads' fp32 logits ``[2, N, V]`` kept by the forward (the fake kernel's shape): the JSD
    pass and the backward read them and agree with the recomputing paths."""
    n, vocab = 96, 300
    hs, ws_, bs = make_head(n, 37, vocab, dtype=torch.float32, bias=True, gen=gen)
    ht, wt, _ = make_head(n, 24, vocab, dtype=torch.float32, gen=gen)
    opts = DivergenceOptions(kind=kind, beta=0.4, student=Transform(0.9, 7.0, 1.1), teacher=Transform(0.9, None, 0.6),
                             entropy=True, vocab_size=vocab, cache=True)
    args = (hs, ws_, bs, ht, wt, None, None, *divergence_to_args(opts), "triton")
    with settings(keep_logits=True):
        stats, cache = torch.ops.fastpref.divergence_fwd(*args)
    with settings(keep_logits=False):
        stats_r, none = torch.ops.fastpref.divergence_fwd(*args)
    assert tuple(cache.shape) == _div_kernels.divergence_cache_shape(n, vocab, hs.dtype, opts) == (2, n, vocab)
    assert none.numel() == 0
    zs = reference.materialize_logits(hs.double(), ws_.double(), bs.double(), temperature=0.9, softcap=7.0,
                                      logit_scale=1.1)
    zt = reference.materialize_logits(ht.double(), wt.double(), temperature=0.9, logit_scale=0.6)
    assert (cache[0].double() - zs).abs().max() < 1e-5 * (1 + zs.abs().max())
    assert (cache[1].double() - zt).abs().max() < 1e-5 * (1 + zt.abs().max())
    torch.testing.assert_close(stats, stats_r, rtol=1e-6, atol=1e-6)
    labels = make_labels(n, vocab, ignored=0.2, gen=gen)
    saved = finish_divergence(stats, labels, opts).saved
    grad = C.mask_divergence_grad(torch.randn(n, generator=gen), labels, opts)
    bwd = (grad, hs, ws_, bs, ht, wt, None, saved)
    a = torch.ops.fastpref.divergence_bwd(*bwd, cache, *divergence_to_args(opts), "triton", True, True, True)
    r = torch.ops.fastpref.divergence_bwd(*bwd, none, *divergence_to_args(opts), "triton", True, True, True)
    for name, x, y in zip(GRAD_NAMES, a, r):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_identical_heads_is_zero(gen, kind):
    """teacher == student  =>  divergence 0 and zero gradient (up to fp32 rounding)."""
    h0, w0, b0 = make_head(96, 37, 1000, dtype=torch.float32, bias=True, gen=gen)
    h, w, b = _leaf(h0, torch.float32), _leaf(w0, torch.float32), _leaf(b0, torch.float32)
    div = fastpref.linear_divergence(h, w, h0, w0, student_bias=b, teacher_bias=b0, kind=kind, backend="triton")
    (div * torch.randn(96, generator=gen)).sum().backward()
    assert div.abs().max() < 1e-5
    for t in (h, w, b):
        assert t.grad.abs().max() < 1e-5


# --------------------------------------------------------------------------- precision and registered ops


def test_fp32_operands_follow_pytorchs_tf32_setting(monkeypatch):
    """On a GPU, fp32 tiles use TF32 exactly when PyTorch's fp32 matmuls do; 16-bit ones never ask."""
    monkeypatch.setattr(_tiles, "interpreting", lambda: False)
    cuda, m = torch.device("cuda"), torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("torch < 2.9: no torch.backends.cuda.matmul.fp32_precision")
    old = m.fp32_precision
    try:
        for prec, want in (("tf32", "tf32"), ("ieee", "ieee")):
            m.fp32_precision = prec
            assert _tiles.operand_class(torch.float32, cuda) == want
            assert _tiles.head_flags(None, None, torch.float32, cuda) == (False, False, True, want)
            assert _tiles.operand_class(torch.bfloat16, cuda) == "16bit"
            assert _tiles.head_flags(1, 2.0, torch.bfloat16, cuda) == (True, True, False, "ieee")
    finally:
        m.fp32_precision = old
    assert _tiles.operand_class(torch.float32, torch.device("cpu")) == "ieee"


def test_registered_ops_pass_opcheck(gen):
    """Schema, fake (meta) implementations — the cache shapes included — and dispatch of the four
    ``fastpref::*`` ops on this backend."""
    n, d, vocab = 70, 40, 300
    h, w, b = make_head(n, d, vocab, dtype=torch.float32, bias=True, gen=gen)
    ht, wt, _ = make_head(n, 24, vocab, dtype=torch.float32, gen=gen)
    labels = make_labels(n, vocab, ignored=0.2, gen=gen)
    gl, ge = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    ops = torch.ops.fastpref
    opts = LogprobsOptions(entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True,
                           transform=Transform(0.8, 10.0, 1.3), vocab_size=vocab, cache=True)
    stats, cache = ops.logprobs_fwd(h, w, labels, b, *logprobs_to_args(opts), "triton")
    assert cache.numel() > 0
    rows = finish_logprobs(stats, labels, opts)
    torch.library.opcheck(ops.logprobs_fwd, (h, w, labels, b, *logprobs_to_args(opts), "triton"))
    plain = LogprobsOptions(vocab_size=vocab)
    torch.library.opcheck(ops.logprobs_fwd, (h, w, labels, None, *logprobs_to_args(plain), "triton"))
    torch.library.opcheck(ops.logprobs_bwd, (gl, ge, h, w, labels, b, rows.lse, rows.entropy, cache,
                                             *logprobs_to_args(opts), "triton", True, True, True))
    torch.library.opcheck(ops.logprobs_bwd, (gl, None, h, w, labels, None, rows.lse, None, torch.empty(0),
                                             *logprobs_to_args(plain), "triton", True, False, False))
    for kind in Kind:
        dopts = DivergenceOptions(kind=kind, beta=0.4, student=Transform(1.0, None, 1.2),
                                  teacher=Transform(1.0, 15.0, 0.9), entropy=True, vocab_size=vocab, cache=True)
        args = (h, w, b, ht, wt, None, None, *divergence_to_args(dopts), "triton")
        torch.library.opcheck(ops.divergence_fwd, args)
        stats, cache = ops.divergence_fwd(*args)
        assert cache.numel() > 0
        saved = finish_divergence(stats, labels, dopts).saved
        torch.library.opcheck(ops.divergence_bwd, (gl, h, w, b, ht, wt, None, saved, cache,
                                                   *divergence_to_args(dopts), "triton", True, True, True))
