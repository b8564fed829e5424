"""Triton backend under the interpreter (CPU): forward values and gradients against the fp64
oracle, judged by the kernel error vs PyTorch's own error in the same dtype:

    max|out - truth| <= 2 * max|naive_same_dtype - truth| + floor

``naive_same_dtype`` is the oracle with ``precision="native"``; both errors are printed
(``pytest -s``) so the headroom shows.  Shapes are small and odd on purpose (V = 123 and 1000,
D = 37, N = 96: partial row, vocabulary and D tiles; two vocabulary splits; several dz chunks
where the workspace is shrunk).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("numpy")

import torch  # noqa: E402

import fastpref  # noqa: E402
from fastpref import reference  # noqa: E402
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
    from fastpref.kernels import linear_logprobs as _lp_kernels
    from triton.runtime.interpreter import InterpretedFunction
except Exception as exc:  # pragma: no cover - reported as a skip reason
    pytest.skip(f"fastpref.kernels cannot be imported: {exc}", allow_module_level=True)
if not isinstance(_lp_kernels._logprobs_fwd_kernel, InterpretedFunction):
    pytest.skip(
        "fastpref.kernels was imported before TRITON_INTERPRET=1 was set (run this module in its own "
        "process)", allow_module_level=True,
    )

FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3}  # x (1 + max|truth|): a few ulps of the output scale


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def workspace():
    """Yields a setter for the dz workspace; restores the process-wide value afterwards."""
    old = fastpref.get_workspace_bytes()
    yield fastpref.set_workspace_bytes
    fastpref.set_workspace_bytes(old)


def _check(name, out, naive, truth, dtype):
    truth = truth.detach().double()
    e_out = (out.detach().double() - truth).abs().max().item()
    e_naive = (naive.detach().double() - truth).abs().max().item()
    floor = FLOOR[dtype] * (1.0 + truth.abs().max().item())
    print(f"  {name:<8} triton err {e_out:.3e}   naive {dtype} err {e_naive:.3e}   floor {floor:.1e}")
    assert math.isfinite(e_out), f"{name}: non-finite output"
    assert e_out <= 2.0 * e_naive + floor, f"{name}: error {e_out:.3e} > 2 x naive {e_naive:.3e} + {floor:.1e}"


def _leaf(t, dtype, requires_grad=True):
    return t.detach().to(dtype).clone().requires_grad_(requires_grad)


def _labels(gen, n, vocab, ignored):
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if ignored >= 1.0:
        return torch.full_like(labels, -100)
    drop = torch.rand(n, generator=gen) < ignored
    return torch.where(drop, torch.full_like(labels, -100), labels)


def _head(gen, n, d, vocab, scale, bias):
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(vocab, d, generator=gen) * (scale / math.sqrt(d))
    b = torch.randn(vocab, generator=gen) * 0.5 if bias else None
    return h, w, b


def _grads(tensors):
    return [None if t is None or t.grad is None else t.grad for t in tensors]


# --------------------------------------------------------------------------- linear_logprobs

LOGPROBS_CASES = [
    # id, dtype, V, ignored fraction, bias, temperature, softcap, entropy, logit scale, workspace bytes
    ("fp32-V123-ign20-entropy", torch.float32, 123, 0.2, False, 1.0, None, True, 2.0, None),
    ("fp32-V1000-bias-T0.7", torch.float32, 1000, 0.2, True, 0.7, None, True, 2.0, None),
    ("fp32-V1000-softcap5", torch.float32, 1000, 0.0, False, 1.0, 5.0, True, 6.0, None),
    ("fp32-V1000-nolentropy", torch.float32, 1000, 0.2, True, 1.0, None, False, 2.0, None),
    ("fp32-V1000-bias-4chunks", torch.float32, 1000, 0.2, True, 1.3, 4.0, True, 4.0, 65536),
    ("bf16-V1000-bias", torch.bfloat16, 1000, 0.2, True, 1.0, None, True, 2.0, None),
    ("bf16-V123-softcap-T2", torch.bfloat16, 123, 0.2, False, 2.0, 3.0, True, 6.0, None),
    ("bf16-V1000-bias-chunks", torch.bfloat16, 1000, 0.2, True, 1.0, None, True, 2.0, 65536),
]


@pytest.mark.parametrize(
    "dtype,vocab,ignored,bias,temperature,softcap,entropy,scale,ws",
    [c[1:] for c in LOGPROBS_CASES], ids=[c[0] for c in LOGPROBS_CASES],
)
def test_logprobs_matches_oracle(gen, workspace, dtype, vocab, ignored, bias, temperature, softcap, entropy,
                                 scale, ws):
    n, d = 96, 37
    if ws is not None:
        workspace(ws)
    h0, w0, b0 = _head(gen, n, d, vocab, scale, bias)
    labels = _labels(gen, n, vocab, ignored)
    g_logp = torch.randn(n, generator=gen)
    g_ent = torch.randn(n, generator=gen)
    kw = dict(temperature=temperature, softcap=softcap, return_entropy=entropy)

    def run(fn, prec_dtype, **extra):
        h, w = _leaf(h0, prec_dtype), _leaf(w0, prec_dtype)
        b = None if b0 is None else _leaf(b0, prec_dtype)
        out = fn(h, w, labels, b, **kw, **extra)
        lp, ent = out if entropy else (out, None)
        loss = (lp.double() * g_logp.double()).sum()
        if entropy:
            loss = loss + (ent.double() * g_ent.double()).sum()
        loss.backward()
        return lp, ent, _grads([h, w, b])

    lp, ent, grads = run(fastpref.linear_logprobs, dtype, backend="triton")
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    n_lp, n_ent, n_grads = run(reference.linear_logprobs, dtype, precision="native")
    t_lp, t_ent, t_grads = run(reference.linear_logprobs, torch.float64, precision="fp64")
    print()
    _check("logp", lp, n_lp, t_lp, dtype)
    if entropy:
        _check("entropy", ent, n_ent, t_ent, dtype)
    for name, got, nv, tv in zip(("d_hidden", "d_weight", "d_bias"), grads, n_grads, t_grads):
        if tv is None:
            assert got is None
            continue
        assert got.dtype == dtype
        _check(name, got, nv, tv, dtype)
    ignored_rows = labels == -100
    assert torch.all(lp[ignored_rows] == 0)
    assert torch.all(grads[0][ignored_rows] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_all_ignored_gives_zeros(gen, dtype):
    h0, w0, b0 = _head(gen, 70, 37, 123, 2.0, True)
    h, w, b = _leaf(h0, dtype), _leaf(w0, dtype), _leaf(b0, dtype)
    labels = torch.full((70,), -100)
    lp, ent = fastpref.linear_logprobs(h, w, labels, b, return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    assert torch.all(lp == 0) and torch.all(ent == 0)
    for t in (h, w, b):
        assert t.grad is not None and torch.all(t.grad == 0)


def test_logprobs_frozen_head_gets_no_gradient(gen):
    h0, w0, b0 = _head(gen, 96, 37, 1000, 2.0, True)
    labels = _labels(gen, 96, 1000, 0.2)
    h, w, b = _leaf(h0, torch.float32), _leaf(w0, torch.float32, False), _leaf(b0, torch.float32, False)
    lp = fastpref.linear_logprobs(h, w, labels, b, backend="triton")
    g = torch.randn(96, generator=gen)
    (lp * g).sum().backward()
    assert w.grad is None and b.grad is None
    ht = _leaf(h0, torch.float64)
    (reference.linear_logprobs(ht, w0.double(), labels, b0.double()) * g.double()).sum().backward()
    hn = _leaf(h0, torch.float32)
    (reference.linear_logprobs(hn, w0, labels, b0, precision="native") * g).sum().backward()
    print()
    _check("d_hidden", h.grad, hn.grad, ht.grad, torch.float32)


def test_logprobs_bad_label_is_nan_not_oob(gen):
    """Labels outside [0, V) (validation bypassed: the raw op) give NaN, never a stray read."""
    h0, w0, _ = _head(gen, 80, 37, 123, 2.0, False)
    labels = _labels(gen, 80, 123, 0.0)
    labels[3], labels[40], labels[79] = 123, -5, 10**6
    out = logprobs_rows(h0, w0, labels, None, LogprobsOptions(entropy=True), "triton")  # unchecked internal call
    logp, entropy = out.logp, out.entropy
    bad = torch.zeros(80, dtype=torch.bool)
    bad[[3, 40, 79]] = True
    assert torch.isnan(logp[bad]).all() and torch.isnan(entropy[bad]).all()
    assert torch.isfinite(logp[~bad]).all()
    truth = reference.linear_logprobs(h0.double(), w0.double(), torch.where(bad, 0, labels))
    assert (logp[~bad].double() - truth[~bad]).abs().max() < 1e-4


def test_logprobs_shift_invariance(gen):
    """A bias that adds the same constant to every logit changes nothing."""
    h0, w0, b0 = _head(gen, 96, 37, 1000, 2.0, True)
    labels = _labels(gen, 96, 1000, 0.2)
    a = fastpref.linear_logprobs(h0, w0, labels, b0, backend="triton")
    b = fastpref.linear_logprobs(h0, w0, labels, b0 + 3.0, backend="triton")
    assert (a - b).abs().max() < 1e-5


def test_logprobs_fp64_inputs_give_fp64(gen):
    """float64 inputs are routed to the torch backend (the kernels accumulate in fp32)."""
    h0, w0, b0 = _head(gen, 96, 37, 123, 2.0, True)
    labels = _labels(gen, 96, 123, 0.2)
    h = _leaf(h0, torch.float64)
    lp = fastpref.linear_logprobs(h, w0.double(), labels, b0.double(), backend="triton")
    assert lp.dtype == torch.float64
    truth = reference.linear_logprobs(h0.double(), w0.double(), labels, b0.double())
    assert (lp - truth).abs().max() < 1e-12


# --------------------------------------------------------------------------- linear_divergence

DIVERGENCE_CASES = [
    # id, dtype, kind, beta, V, ignored, biases, temperature, (s_softcap, t_softcap), labels?, workspace
    ("fkl-fp32-V123-ign20", torch.float32, "forward_kl", 0.5, 123, 0.2, False, 1.0, (None, None), True, None),
    ("rkl-fp32-V1000-bias-T0.8", torch.float32, "reverse_kl", 0.5, 1000, 0.2, True, 0.8, (None, None), True, None),
    ("jsd0.3-fp32-V1000-bias", torch.float32, "jsd", 0.3, 1000, 0.2, True, 1.0, (None, None), True, None),
    ("jsd0.5-fp32-V123-softcaps-nolabels", torch.float32, "jsd", 0.5, 123, 0.0, False, 1.0, (4.0, 6.0), False,
     None),
    ("rkl-fp32-V1000-softcap-chunks", torch.float32, "reverse_kl", 0.5, 1000, 0.2, True, 1.0, (5.0, None), True,
     65536),
    ("fkl-bf16-V1000-bias", torch.bfloat16, "forward_kl", 0.5, 1000, 0.2, True, 1.0, (None, None), True, None),
    ("jsd0.7-bf16-V123-ign100", torch.bfloat16, "jsd", 0.7, 123, 1.0, False, 1.0, (None, None), True, None),
    ("rkl-bf16-V1000-chunks", torch.bfloat16, "reverse_kl", 0.5, 1000, 0.2, True, 1.0, (None, None), True, 65536),
]


@pytest.mark.parametrize(
    "dtype,kind,beta,vocab,ignored,biases,temperature,softcaps,with_labels,ws",
    [c[1:] for c in DIVERGENCE_CASES], ids=[c[0] for c in DIVERGENCE_CASES],
)
def test_divergence_matches_oracle(gen, workspace, dtype, kind, beta, vocab, ignored, biases, temperature, softcaps,
                                   with_labels, ws):
    n, ds, dt = 96, 37, 50
    if ws is not None:
        workspace(ws)
    hs0, ws0, bs0 = _head(gen, n, ds, vocab, 3.0, biases)
    ht0, wt0, bt0 = _head(gen, n, dt, vocab, 3.0, biases)
    labels = _labels(gen, n, vocab, ignored) if with_labels else None
    g = torch.randn(n, generator=gen)
    s_cap, t_cap = softcaps

    def run(fn, prec_dtype, **extra):
        hs, w = _leaf(hs0, prec_dtype), _leaf(ws0, prec_dtype)
        bs = None if bs0 is None else _leaf(bs0, prec_dtype)
        ht, wt = ht0.to(prec_dtype), wt0.to(prec_dtype)
        bt = None if bt0 is None else bt0.to(prec_dtype)
        div = fn(hs, w, ht, wt, labels, student_bias=bs, teacher_bias=bt, kind=kind, beta=beta,
                 temperature=temperature, student_softcap=s_cap, teacher_softcap=t_cap, **extra)
        (div.double() * g.double()).sum().backward()
        return div, _grads([hs, w, bs])

    div, grads = run(fastpref.linear_divergence, dtype, backend="triton")
    assert div.dtype == torch.float32 and div.shape == (n,)
    n_div, n_grads = run(reference.linear_divergence, dtype, precision="native")
    t_div, t_grads = run(reference.linear_divergence, torch.float64, precision="fp64")
    print()
    _check(kind, div, n_div, t_div, dtype)
    for name, got, nv, tv in zip(("d_hidden", "d_weight", "d_bias"), grads, n_grads, t_grads):
        if tv is None:
            assert got is None
            continue
        assert got.dtype == dtype
        _check(name, got, nv, tv, dtype)
    if labels is not None:
        ignored_rows = labels == -100
        assert torch.all(div[ignored_rows] == 0) and torch.all(grads[0][ignored_rows] == 0)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_identical_heads_is_zero(gen, kind):
    """teacher == student  =>  divergence 0 and zero gradient (up to fp32 rounding)."""
    h0, w0, b0 = _head(gen, 96, 37, 1000, 3.0, True)
    h, w, b = _leaf(h0, torch.float32), _leaf(w0, torch.float32), _leaf(b0, torch.float32)
    div = fastpref.linear_divergence(h, w, h0, w0, student_bias=b, teacher_bias=b0, kind=kind, backend="triton")
    (div * torch.randn(96, generator=gen)).sum().backward()
    assert div.abs().max() < 1e-5
    for t in (h, w, b):
        assert t.grad.abs().max() < 1e-5


def test_divergence_frozen_student_head(gen):
    hs0, ws0, _ = _head(gen, 96, 37, 1000, 3.0, False)
    ht0, wt0, _ = _head(gen, 96, 50, 1000, 3.0, False)
    hs, w = _leaf(hs0, torch.float32), _leaf(ws0, torch.float32, False)
    div = fastpref.linear_divergence(hs, w, ht0, wt0, kind="reverse_kl", backend="triton")
    g = torch.randn(96, generator=gen)
    (div * g).sum().backward()
    assert w.grad is None
    ht = _leaf(hs0, torch.float64)
    (reference.linear_divergence(ht, ws0.double(), ht0.double(), wt0.double(), kind="reverse_kl")
     * g.double()).sum().backward()
    hn = _leaf(hs0, torch.float32)
    (reference.linear_divergence(hn, ws0, ht0, wt0, kind="reverse_kl", precision="native") * g).sum().backward()
    print()
    _check("d_hidden", hs.grad, hn.grad, ht.grad, torch.float32)


# --------------------------------------------------------------------------- registered ops


def test_registered_ops_pass_opcheck(gen):
    """Schema, fake (meta) implementations and dispatch of the four ``fastpref::*`` ops on this backend."""
    n, d, vocab = 70, 40, 300
    h, w, b = _head(gen, n, d, vocab, 2.0, True)
    ht, wt, _ = _head(gen, n, 24, vocab, 2.0, False)
    labels = _labels(gen, n, vocab, 0.2)
    gl, ge = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    ops = torch.ops.fastpref
    opts = LogprobsOptions(entropy=True, transform=Transform(0.8, 10.0, 1.3), vocab_size=vocab)
    stats, cache = ops.logprobs_fwd(h, w, labels, b, *logprobs_to_args(opts), "triton")
    rows = finish_logprobs(stats, labels, opts)
    torch.library.opcheck(ops.logprobs_fwd, (h, w, labels, b, *logprobs_to_args(opts), "triton"))
    plain = LogprobsOptions(vocab_size=vocab)
    torch.library.opcheck(ops.logprobs_fwd, (h, w, labels, None, *logprobs_to_args(plain), "triton"))
    torch.library.opcheck(ops.logprobs_bwd, (gl, ge, h, w, labels, b, rows.lse, rows.entropy, cache,
                                             *logprobs_to_args(opts), "triton", True, True, True))
    torch.library.opcheck(ops.logprobs_bwd, (gl, None, h, w, labels, None, rows.lse, None, cache,
                                             *logprobs_to_args(plain), "triton", True, False, False))
    for kind in Kind:
        dopts = DivergenceOptions(kind=kind, beta=0.4, teacher=Transform(1.0, 15.0), vocab_size=vocab)
        args = (h, w, b, ht, wt, None, None, *divergence_to_args(dopts), "triton")
        torch.library.opcheck(ops.divergence_fwd, args)
        stats, cache = ops.divergence_fwd(*args)
        saved = finish_divergence(stats, labels, dopts).saved
        torch.library.opcheck(ops.divergence_bwd, (gl, h, w, b, ht, wt, None, saved, cache,
                                                   *divergence_to_args(dopts), "triton", True, True, True))
