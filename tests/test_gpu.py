"""GPU checks of the Triton backend (marker ``gpu``; skipped without CUDA).

Run in a process of their own, without ``tests/test_triton_backend.py`` (that module turns on
the Triton interpreter for the whole process):

    pytest -m gpu tests/ --ignore=tests/test_triton_backend.py

Accuracy rule as on CPU (tests/conftest.py): ``max|out - truth| <= 2 max|naive - truth| + floor``.
At Llama-3 size (N=16384, D=4096, V=128256, bf16) the truth is an fp32 materialising reference taken
in row chunks (TF32 off) and "naive" the same chunks with bf16 GEMMs and fp32 softmax (dz rounded to
bf16, as autograd of the naive code does).  Elsewhere the truth is the fp64 oracle.  The smaller
cases run both backward paths: logits kept from the forward (they fit the workspace budget) and
recomputed.
"""

import math
import os

import pytest
import torch
from conftest import assert_accurate, seeded_generator, settings

import fastpref
from fastpref import reference
from fastpref.backends import contract as C

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = torch.device("cuda")
ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture(autouse=True)
def _no_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: run the GPU tests without tests/test_triton_backend.py")
    reason = fastpref.available_backends(DEV)["triton"]
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def gen(request):
    """A CUDA generator seeded from the test id (conftest's ``gen`` is a CPU one)."""
    return seeded_generator(request, DEV)


def _leaf(t, dtype):
    """A fresh leaf copy in ``dtype`` (never the input itself, which later runs reuse)."""
    return t.detach().to(dtype).clone().requires_grad_()


def _inputs(gen, n, d, vocab, dtype, ignored=0.2, scale=2.0):
    h = torch.randn(n, d, generator=gen, device=DEV).to(dtype)
    w = (torch.randn(vocab, d, generator=gen, device=DEV) * (scale / math.sqrt(d))).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=DEV)
    drop = torch.rand(n, generator=gen, device=DEV) < ignored
    labels = torch.where(drop, torch.full_like(labels, -100), labels)
    return h, w, labels


def _chunked_reference(h, w, labels, g_logp, g_ent, native, rows=1024):
    """logp, entropy, d_hidden, d_weight of the materialising formulas, ``rows`` rows at a time.

    native=False: fp32 operands and fp32 everything (the truth).  native=True: GEMMs in the input
    dtype (fp32 accumulation), softmax math in fp32, dz rounded to the input dtype."""
    n, vocab = h.shape[0], w.shape[0]
    w_op = w if native else w.float()
    logp = torch.empty(n, device=DEV)
    ent = torch.empty(n, device=DEV)
    dh = torch.empty(n, w.shape[1], device=DEV)
    dw = torch.zeros(vocab, w.shape[1], device=DEV)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        hc = h[r0:r1] if native else h[r0:r1].float()
        z = (hc @ w_op.T).float()
        logsm = torch.log_softmax(z, -1)
        del z
        lab = labels[r0:r1]
        keep = lab != -100
        safe = torch.where(keep, lab, torch.zeros_like(lab))
        p = logsm.exp()
        lp = logsm.gather(1, safe[:, None])[:, 0]
        e = -(p * logsm).sum(-1)
        logp[r0:r1] = torch.where(keep, lp, torch.zeros_like(lp))
        ent[r0:r1] = torch.where(keep, e, torch.zeros_like(e))
        gl = torch.where(keep, g_logp[r0:r1], torch.zeros_like(lp))
        ge = torch.where(keep, g_ent[r0:r1], torch.zeros_like(lp))
        # d/dz of gl*logp + ge*entropy: gl (onehot - p) - ge p (log p + H)
        dz = -p * (gl[:, None] + ge[:, None] * (logsm + e[:, None]))
        dz.scatter_add_(1, safe[:, None], gl[:, None])
        del p, logsm
        dz = dz.to(h.dtype) if native else dz
        dh[r0:r1] = (dz @ w_op).float()
        dw += (dz.T @ hc).float()
        del dz
    return logp, ent, dh, dw


@pytest.mark.parametrize("shape", [(16384, 4096, 128256)], ids=["llama3-N16384-D4096-V128256"])
def test_logprobs_llama3_bf16(gen, shape):
    n, d, vocab = shape
    h, w, labels = _inputs(gen, n, d, vocab, torch.bfloat16)
    g_logp = torch.randn(n, generator=gen, device=DEV)
    g_ent = torch.randn(n, generator=gen, device=DEV)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = fastpref.linear_logprobs(hl, wl, labels, return_entropy=True, backend="triton")
    (logp * g_logp + ent * g_ent).sum().backward()
    got = (logp, ent, hl.grad, wl.grad)
    del hl, wl
    torch.cuda.empty_cache()
    truth = _chunked_reference(h, w, labels, g_logp, g_ent, native=False)
    naive = _chunked_reference(h, w, labels, g_logp, g_ent, native=True)
    print()
    for name, a, nv, tv in zip(("logp", "entropy", "d_hidden", "d_weight"), got, naive, truth):
        assert_accurate(name, a, nv, tv, torch.bfloat16)


LOGPROBS_CASES = [  # id, dtype, V, bias, temperature, softcap, logit_scale, keep the logits?
    ("fp32-V32001-bias-T0.7-recomputed", torch.float32, 32001, True, 0.7, None, 1.0, False),
    ("bf16-V32001-softcap30-scale1.3-kept", torch.bfloat16, 32001, False, 1.0, 30.0, 1.3, True),
    ("bf16-V50257-bias-recomputed", torch.bfloat16, 50257, True, 1.0, None, 1.0, False),
    ("fp32-V50257-kept", torch.float32, 50257, False, 1.0, None, 1.0, True),
]


@pytest.mark.parametrize("dtype,vocab,bias,temperature,softcap,scale,keep", [c[1:] for c in LOGPROBS_CASES],
                         ids=[c[0] for c in LOGPROBS_CASES])
def test_logprobs_vs_fp64_oracle(gen, dtype, vocab, bias, temperature, softcap, scale, keep):
    """Every output (entropy, log sum p^2, mean logit, is_top1) and the gradients; the N x V fp32 logits
    (115-181 MB) fit the cache share of the default 256 MiB budget, so ``keep`` decides the backward's path."""
    n, d = 900, 1024
    h0, w0, labels = _inputs(gen, n, d, vocab, torch.float32, scale=8.0 if softcap else 2.0)
    b0 = torch.randn(vocab, generator=gen, device=DEV) * 0.5 if bias else None
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=scale, outputs=ALL_OUTPUTS)
    z = reference.materialize_logits(h0.double(), w0.double(), None if b0 is None else b0.double(),
                                     temperature=temperature, softcap=softcap, logit_scale=scale)
    pick = (torch.rand(n, generator=gen, device=DEV) < 0.3) & (labels != -100)
    labels = torch.where(pick, z.argmax(-1), labels)  # rows whose label is the argmax: is_top1 True
    del z
    g_logp = torch.randn(n, generator=gen, device=DEV)
    g_ent = torch.randn(n, generator=gen, device=DEV)

    def run(fn, dt, **extra):
        h = _leaf(h0, dt)
        w = _leaf(w0, dt)
        b = None if b0 is None else _leaf(b0, dt)
        out = fn(h, w, labels, b, **kw, **extra)
        out = out if isinstance(out, dict) else out._asdict()
        (out["logp"].double() * g_logp.double() + out["entropy"].double() * g_ent.double()).sum().backward()
        return out, [h.grad, w.grad] + ([b.grad] if b is not None else [])

    with settings(keep_logits=keep):
        got, got_g = run(fastpref.linear_logprobs, dtype, backend="triton")
    naive, naive_g = run(reference.linear_logprobs, dtype, precision="native")
    truth, truth_g = run(reference.linear_logprobs, torch.float64, precision="fp64")
    print()
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_accurate(name, got[name], naive[name], truth[name], dtype)
    assert torch.equal(got["is_top1"], truth["is_top1"]) and truth["is_top1"].any()
    for name, a, nv, tv in zip(("d_hidden", "d_weight", "d_bias"), got_g, naive_g, truth_g):
        assert_accurate(name, a, nv, tv, dtype)


DIVERGENCE_CASES = [  # (dtype, kind, beta, keep the logits?): each kind on both paths across the dtypes
    (torch.float32, "forward_kl", 0.5, True), (torch.float32, "reverse_kl", 0.5, False), (torch.float32, "jsd", 0.3, True),
    (torch.bfloat16, "forward_kl", 0.5, False), (torch.bfloat16, "reverse_kl", 0.5, True),
    (torch.bfloat16, "jsd", 0.3, False),
]


@pytest.mark.parametrize("dtype,kind,beta,keep", DIVERGENCE_CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}-{'kept' if c[3] else 'recomputed'}" for c in DIVERGENCE_CASES])
def test_divergence_vs_fp64_oracle(gen, kind, beta, dtype, keep):
    """Per-head logit scales and softcap, the student entropy; both heads' logits (2 x 64 MB) fit the
    default budget, so ``keep`` decides whether the JSD pass and the backward recompute them."""
    n, ds, dt, vocab = 500, 768, 1024, 32001
    hs0, ws0, labels = _inputs(gen, n, ds, vocab, torch.float32, scale=3.0)
    ht0, wt0, _ = _inputs(gen, n, dt, vocab, torch.float32, scale=3.0)
    bs0 = torch.randn(vocab, generator=gen, device=DEV) * 0.5
    g = torch.randn(n, generator=gen, device=DEV)
    kw = dict(kind=kind, beta=beta, temperature=0.9, student_logit_scale=1.2, teacher_logit_scale=0.8,
              teacher_softcap=15.0, return_entropy=True)

    def run(fn, dty, **extra):
        hs, w, b = _leaf(hs0, dty), _leaf(ws0, dty), _leaf(bs0, dty)
        div, ent = fn(hs, w, ht0.to(dty), wt0.to(dty), labels, student_bias=b, **kw, **extra)
        (div.double() * g.double()).sum().backward()
        return div, ent, hs.grad, w.grad, b.grad

    with settings(keep_logits=keep):
        got = run(fastpref.linear_divergence, dtype, backend="triton")
    naive = run(reference.linear_divergence, dtype, precision="native")
    truth = run(reference.linear_divergence, torch.float64, precision="fp64")
    print()
    for name, a, nv, tv in zip((kind, "entropy", "d_hidden", "d_weight", "d_bias"), got, naive, truth):
        assert_accurate(name, a, nv, tv, dtype)


def test_fp32_follows_pytorchs_tf32_setting(gen):
    """TF32 off: fp32 tiles are exact-fp32 accurate (accuracy rule against naive fp32).  TF32 on: the
    tiles run on TF32 tensor cores — the log-probs move by TF32-sized amounts — and stay within a TF32
    budget: 4x naive PyTorch's error under the same setting (not 2x: Triton's tf32 MMA may truncate the
    operands' mantissas where cuBLAS rounds them, twice the unit roundoff)."""
    n, d, vocab = 1000, 1024, 32001
    h0, w0, labels = _inputs(gen, n, d, vocab, torch.float32)
    g = torch.randn(n, generator=gen, device=DEV)
    old = torch.backends.cuda.matmul.allow_tf32
    runs = {}
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            res = []
            for fn, dt, extra in ((fastpref.linear_logprobs, torch.float32, dict(backend="triton")),
                                  (reference.linear_logprobs, torch.float32, dict(precision="native"))):
                h, w = _leaf(h0, dt), _leaf(w0, dt)
                lp = fn(h, w, labels, **extra)
                (lp.double() * g.double()).sum().backward()
                res.append((lp.detach(), h.grad, w.grad))
            runs[tf32] = res
        h, w = _leaf(h0, torch.float64), _leaf(w0, torch.float64)
        lp = reference.linear_logprobs(h, w, labels)
        (lp * g.double()).sum().backward()
        truth = (lp.detach(), h.grad, w.grad)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    print()
    names = ("logp", "d_hidden", "d_weight")
    for i, name in enumerate(names):
        assert_accurate(name, runs[False][0][i], runs[False][1][i], truth[i], torch.float32)
    moved = (runs[True][0][0] - runs[False][0][0]).abs().max().item()
    assert moved > 1e-5, f"TF32 on changed the log-probs by only {moved:.1e}: the fp32 tiles ignore the setting"
    for i, name in enumerate(names):
        err = (runs[True][0][i].double() - truth[i]).abs().max().item()
        err_naive = (runs[True][1][i].double() - truth[i]).abs().max().item()
        print(f"{name} (tf32): err={err:.3e} naive_err={err_naive:.3e}")
        assert err <= 4 * err_naive + 1e-6 * max(1.0, truth[i].abs().max().item()), name


def test_backward_is_deterministic(gen):
    h0, w0, labels = _inputs(gen, 4096, 1024, 32001, torch.bfloat16)
    g = torch.randn(4096, generator=gen, device=DEV)
    grads = []
    for _ in range(2):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        (fastpref.linear_logprobs(h, w, labels, backend="triton") * g).sum().backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_torch_compile_fullgraph(gen):
    h0, w0, labels = _inputs(gen, 512, 256, 5003, torch.bfloat16)
    g = torch.randn(512, generator=gen, device=DEV)

    def loss_fn(h, w, lab):
        lp, ent = fastpref.linear_logprobs(h, w, lab, return_entropy=True, backend="triton", softcap=20.0)
        return (lp * g).sum() + 0.1 * ent.sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w, labels)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss_e, dh_e, dw_e), (loss_c, dh_c, dw_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)  # inductor may reorder the sums
    assert torch.equal(dh_c, dh_e) and torch.equal(dw_c, dw_e)  # same op, same upstream grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(gen, dtype):
    """The four registered ops with the Triton backend on CUDA tensors: schema, fake kernels (the cache
    shapes included), dispatch."""
    n, d, vocab = 200, 96, 1003
    h, w, labels = _inputs(gen, n, d, vocab, dtype)
    b = torch.randn(vocab, generator=gen, device=DEV).to(dtype)
    ht, wt, _ = _inputs(gen, n, 64, vocab, dtype)
    ops = torch.ops.fastpref
    opts = C.LogprobsOptions(entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True,
                             transform=C.Transform(0.8, 10.0, 1.2), vocab_size=vocab, cache=True)
    plain = C.LogprobsOptions(vocab_size=vocab)
    stats, cache = ops.logprobs_fwd(h, w, labels, b, *C.logprobs_to_args(opts), "triton")
    assert cache.numel() > 0
    rows = C.finish_logprobs(stats, labels, opts)
    gl = torch.randn(n, generator=gen, device=DEV)
    ge = torch.randn(n, generator=gen, device=DEV)
    torch.library.opcheck(ops.logprobs_fwd, (h, w, labels, b, *C.logprobs_to_args(opts), "triton"))
    torch.library.opcheck(ops.logprobs_fwd, (h, w, labels, None, *C.logprobs_to_args(plain), "triton"))
    torch.library.opcheck(ops.logprobs_bwd, (gl, ge, h, w, labels, b, rows.lse, rows.entropy, cache,
                                             *C.logprobs_to_args(opts), "triton", True, True, True))
    torch.library.opcheck(ops.logprobs_bwd, (gl, None, h, w, labels, None, rows.lse, None, h.new_empty(0),
                                             *C.logprobs_to_args(plain), "triton", True, False, False))
    for kind in C.Kind:
        dopts = C.DivergenceOptions(kind=kind, beta=0.4, student=C.Transform(1.0, None, 1.1),
                                    teacher=C.Transform(1.0, 15.0, 0.9), entropy=True, vocab_size=vocab, cache=True)
        args = (h, w, b, ht, wt, None, None, *C.divergence_to_args(dopts), "triton")
        torch.library.opcheck(ops.divergence_fwd, args)
        stats, cache = ops.divergence_fwd(*args)
        saved = C.finish_divergence(stats, labels, dopts).saved
        torch.library.opcheck(ops.divergence_bwd, (gl, h, w, b, ht, wt, None, saved, cache,
                                                   *C.divergence_to_args(dopts), "triton", True, True, True))
