"""GPU checks of the Triton backend (marker ``gpu``; skipped without CUDA).

Run in a process of their own, without ``tests/test_triton_backend.py`` (that module turns on
the Triton interpreter for the whole process):

    pytest -m gpu tests/ --ignore=tests/test_triton_backend.py

Accuracy rule as on CPU: ``max|out - truth| <= 2 max|naive - truth| + floor``.  At Llama-3 size
(N=16384, D=4096, V=128256, bf16) the truth is an fp32 materialising reference taken in row
chunks (TF32 off) and "naive" the same chunks with bf16 GEMMs and fp32 softmax (dz rounded to
bf16, as autograd of the naive code does).
"""

import math
import os

import pytest
import torch

import fastpref
from fastpref import reference

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = torch.device("cuda")
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


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
def gen():
    return torch.Generator(device=DEV).manual_seed(4321)


def _check(name, out, naive, truth, dtype):
    truth = truth.detach().double()
    e_out = (out.detach().double() - truth).abs().max().item()
    e_naive = (naive.detach().double() - truth).abs().max().item()
    floor = FLOOR[dtype] * (1.0 + truth.abs().max().item())
    print(f"  {name:<8} triton err {e_out:.3e}   naive {dtype} err {e_naive:.3e}   floor {floor:.1e}")
    assert math.isfinite(e_out), f"{name}: non-finite output"
    assert e_out <= 2.0 * e_naive + floor, f"{name}: error {e_out:.3e} > 2 x naive {e_naive:.3e} + {floor:.1e}"


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
        _check(name, a, nv, tv, torch.bfloat16)


LOGPROBS_CASES = [
    ("fp32-V32001-bias-T0.7", torch.float32, 32001, True, 0.7, None),
    ("bf16-V32001-softcap30", torch.bfloat16, 32001, False, 1.0, 30.0),
    ("bf16-V50257-bias", torch.bfloat16, 50257, True, 1.0, None),
]


@pytest.mark.parametrize("dtype,vocab,bias,temperature,softcap", [c[1:] for c in LOGPROBS_CASES],
                         ids=[c[0] for c in LOGPROBS_CASES])
def test_logprobs_vs_fp64_oracle(gen, dtype, vocab, bias, temperature, softcap):
    n, d = 1000, 1024
    h0, w0, labels = _inputs(gen, n, d, vocab, torch.float32, scale=8.0 if softcap else 2.0)
    b0 = torch.randn(vocab, generator=gen, device=DEV) * 0.5 if bias else None
    g_logp = torch.randn(n, generator=gen, device=DEV)
    g_ent = torch.randn(n, generator=gen, device=DEV)

    def run(fn, dt, **kw):
        h = h0.to(dt).requires_grad_()
        w = w0.to(dt).requires_grad_()
        b = None if b0 is None else b0.to(dt).requires_grad_()
        lp, ent = fn(h, w, labels, b, temperature=temperature, softcap=softcap, return_entropy=True, **kw)
        (lp.double() * g_logp.double() + ent.double() * g_ent.double()).sum().backward()
        return [lp, ent, h.grad, w.grad] + ([b.grad] if b is not None else [])

    got = run(fastpref.linear_logprobs, dtype, backend="triton")
    naive = run(reference.linear_logprobs, dtype, precision="native")
    truth = run(reference.linear_logprobs, torch.float64, precision="fp64")
    print()
    for name, a, nv, tv in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), got, naive, truth):
        _check(name, a, nv, tv, dtype)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_divergence_vs_fp64_oracle(gen, kind, beta, dtype):
    n, ds, dt, vocab = 1000, 768, 1024, 32001
    hs0, ws0, labels = _inputs(gen, n, ds, vocab, torch.float32, scale=3.0)
    ht0, wt0, _ = _inputs(gen, n, dt, vocab, torch.float32, scale=3.0)
    bs0 = torch.randn(vocab, generator=gen, device=DEV) * 0.5
    g = torch.randn(n, generator=gen, device=DEV)

    def run(fn, dty, **kw):
        hs, w, b = hs0.to(dty).requires_grad_(), ws0.to(dty).requires_grad_(), bs0.to(dty).requires_grad_()
        div = fn(hs, w, ht0.to(dty), wt0.to(dty), labels, student_bias=b, kind=kind, beta=beta,
                 temperature=0.9, **kw)
        (div.double() * g.double()).sum().backward()
        return div, hs.grad, w.grad, b.grad

    got = run(fastpref.linear_divergence, dtype, backend="triton")
    naive = run(reference.linear_divergence, dtype, precision="native")
    truth = run(reference.linear_divergence, torch.float64, precision="fp64")
    print()
    for name, a, nv, tv in zip((kind, "d_hidden", "d_weight", "d_bias"), got, naive, truth):
        _check(name, a, nv, tv, dtype)


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
    n, d, vocab = 200, 96, 1003
    h, w, labels = _inputs(gen, n, d, vocab, dtype)
    b = torch.randn(vocab, generator=gen, device=DEV).to(dtype)
    ht, wt, _ = _inputs(gen, n, 64, vocab, dtype)
    ops = torch.ops.fastpref
    logp, ent, lse = ops.logprobs_fwd_triton(h, w, labels, b, -100, 0.8, 10.0, True)
    gl = torch.randn(n, generator=gen, device=DEV)
    ge = torch.randn(n, generator=gen, device=DEV)
    torch.library.opcheck(ops.logprobs_fwd_triton, (h, w, labels, b, -100, 0.8, 10.0, True))
    torch.library.opcheck(ops.logprobs_fwd_triton, (h, w, labels, None, -100, 1.0, None, False))
    torch.library.opcheck(ops.logprobs_bwd_triton,
                          (gl, ge, h, w, labels, b, lse, ent, -100, 0.8, 10.0, True, True, True))
    torch.library.opcheck(ops.logprobs_bwd_triton,
                          (gl, None, h, w, labels, None, lse, None, -100, 0.8, 10.0, True, False, False))
    for kind in (0, 1, 2):
        args = (h, w, ht, wt, labels, b, None, -100, kind, 0.4, 1.0, None, 15.0)
        torch.library.opcheck(ops.divergence_fwd_triton, args)
        _, stats = ops.divergence_fwd_triton(*args)
        torch.library.opcheck(ops.divergence_bwd_triton,
                              (gl, h, w, ht, wt, labels, b, None, stats, -100, kind, 0.4, 1.0, None, 15.0,
                               True, True, True))
