"""Every backend against the fp64 oracle (``fastpref.reference``) on the same cases, by the accuracy rule
of docs/design.md §6 (tests/conftest.py): the forward values (log-probs with each extra output, the
divergences and the student entropy) and every gradient, through the public API.

``backend``: ``torch`` on CPU; ``triton`` on CPU under the Triton interpreter (``TRITON_INTERPRET=1``,
set by conftest when there is no GPU) or, without the interpreter, on the GPU; ``cuda`` on the GPU only
(skipped without one; tests/test_cuda_backend.py runs the CUDA tiling on CPU with a model of the kernels).
The GPU runs carry the ``gpu`` marker.
The oracle runs on CPU in both precisions (``naive`` in the inputs' dtype, ``truth`` in fp64).

Shapes are small and odd on purpose (V = 123 and 1000, D = 37, N = 96: partial row, vocabulary and D
tiles).  fp64 cases are smaller (N = 33-40, D = 17-24): there naive equals truth, so the bound is the
floor alone (8 fp64 ulps), which summation-order differences over many rows can reach.  Each case names its backward path (logits kept from the forward or recomputed, ``dz`` in one
chunk or several), which the budget in ``PATHS`` gives; float64 inputs run the torch backend whatever
the choice (dispatch), so their cases check that routing too.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_accurate, make_head, make_labels, settings

import fastpref
from fastpref import reference
from fastpref.backends import tiling

BACKENDS = ("torch", "triton", "cuda")
ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
GRAD_NAMES = ("d_hidden", "d_weight", "d_bias")
# Backward paths: logits kept from the forward or recomputed, in one dz chunk or several.  With vocabulary
# tiles of >= 64 columns (``narrow_tiles``) a small budget keeps the logits of N=96, V=1000 while the dz
# workspace beside them takes several chunks.
PATHS = {  # path -> (workspace bytes per head count, keep_logits, logits kept?, several dz chunks (Triton)?)
    "cache": ({1: None, 2: None}, True, True, False),
    "recompute": ({1: None, 2: None}, False, False, False),
    "recompute-chunks": ({1: 65536, 2: 65536}, True, False, True),
    "cache-chunks": ({1: 640 * 1024, 2: 1024 * 1024}, True, True, True),
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device(backend: str) -> torch.device:
    """Where ``backend`` runs in this process; skips (with the reason) where it cannot."""
    if backend == "torch":
        return torch.device("cpu")
    if backend == "triton" and _interpreting():
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        pytest.skip(f"{backend}: needs a CUDA GPU" + (" (or TRITON_INTERPRET=1)" if backend == "triton" else ""))
    reason = fastpref.available_backends(device)[backend]
    if reason is not None:
        pytest.skip(f"{backend} on {device}: {reason}")
    if backend == "triton" and device.type == "cpu":
        from fastpref.kernels import linear_logprobs
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(linear_logprobs._logprobs_fwd_kernel, InterpretedFunction):
            pytest.skip("fastpref.kernels was imported before TRITON_INTERPRET=1 was set")
    return device


def _backend_params():
    """The backends, marked ``gpu`` where they run on the GPU (so ``pytest -m gpu`` selects them)."""
    triton_on_gpu = torch.cuda.is_available() and not _interpreting()
    return [pytest.param("torch"), pytest.param("triton", marks=[pytest.mark.gpu] if triton_on_gpu else []),
            pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=_backend_params())
def backend(request, monkeypatch):
    """``(name, device)``; on a GPU, fp32 GEMMs stay fp32 (TF32 off) for the backends and the oracle alike."""
    device = _device(request.param)
    if device.type == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return request.param, device


def _leaf(t, dtype, device="cpu", requires_grad=True):
    return None if t is None else t.detach().to(device=device, dtype=dtype).clone().requires_grad_(requires_grad)


def _grads(tensors):
    return [None if t is None else (None if t.grad is None else t.grad.cpu()) for t in tensors]


def _argmax_labels(labels, h, w, b, gen, share=0.3, **transform):
    """Set about ``share`` of the counted labels to their row's fp64 argmax, so ``is_top1`` is True there."""
    z = reference.materialize_logits(h.double(), w.double(), None if b is None else b.double(), **transform)
    pick = (torch.rand(labels.shape, generator=gen) < share) & (labels != -100)
    return torch.where(pick, z.argmax(-1), labels)


def _path(backend, path, n, vocab, d, dtype, heads, family):
    """The settings of a backward path, after checking that they give that path: whether the forward keeps
    the logits (the planner all backends share), and under the interpreter the Triton dz chunking."""
    name, device = backend
    ws, keep, cached, chunked = PATHS[path]
    elem = 8 if dtype == torch.float64 else 4
    with settings(workspace=ws[heads], keep_logits=keep):
        kept = bool(tiling.plan_cache(n, vocab, elem_bytes=elem, heads=heads))
        assert kept == cached, f"{path}: the planner keeps the logits: {kept}"
        if name == "triton" and device.type == "cpu" and dtype != torch.float64:
            from fastpref.kernels import _tiles

            cfg = _tiles.tile_config(family, device, (d,), dtype)
            cols = _tiles.dz_chunk_columns(n, vocab, dtype.itemsize, cfg.block_v, cached)
            assert (cols < vocab) == chunked, f"{path}: dz chunk {cols}/{vocab}"
    return settings(workspace=ws[heads], keep_logits=keep)


# --------------------------------------------------------------------------- linear_logprobs

LOGPROBS_CASES = [
    # id, dtype, V, ignored, bias, temperature, softcap, logit_scale, outputs, backward path (PATHS)
    ("fp32-V123-all-outputs", torch.float32, 123, 0.2, False, 1.0, None, 1.0, ALL_OUTPUTS, "cache"),
    ("fp32-V1000-bias-T0.7-scale1.5", torch.float32, 1000, 0.2, True, 0.7, None, 1.5, ALL_OUTPUTS, "recompute"),
    ("fp32-V1000-softcap5-logp-only", torch.float32, 1000, 0.0, False, 1.0, 5.0, 2.0, (), "cache"),
    ("fp32-V1000-bias-softcap", torch.float32, 1000, 0.2, True, 1.3, 4.0, 0.8, ALL_OUTPUTS, "recompute-chunks"),
    ("fp32-V1000-entropy", torch.float32, 1000, 0.2, True, 1.0, None, 1.0, ("entropy",), "cache-chunks"),
    ("bf16-V1000-bias", torch.bfloat16, 1000, 0.2, True, 1.0, None, 1.0, ALL_OUTPUTS, "cache"),
    ("bf16-V123-softcap-T2", torch.bfloat16, 123, 0.2, False, 2.0, 3.0, 2.0, ALL_OUTPUTS, "recompute"),
    ("fp16-V1000-bias", torch.float16, 1000, 0.2, True, 1.0, None, 1.0, ("entropy", "is_top1"), "cache-chunks"),
    ("fp64-V123-bias-T1.5-softcap5", torch.float64, 123, 0.2, True, 1.5, 5.0, 1.0, ALL_OUTPUTS, "recompute"),
]


def _check_grads(grads, n_grads, t_grads, dtype, out_ulps):
    """Every gradient the oracle has (``None`` where it has none) in the inputs' dtype, under the rule."""
    for g_name, got, naive, truth in zip(GRAD_NAMES, grads, n_grads, t_grads):
        if truth is None:
            assert got is None
            continue
        assert got.dtype == dtype, f"{g_name} dtype {got.dtype}"
        assert_accurate(g_name, got, naive, truth, dtype, out_ulps=out_ulps)


@pytest.mark.parametrize(
    "dtype,vocab,ignored,bias,temperature,softcap,scale,outputs,path",
    [c[1:] for c in LOGPROBS_CASES], ids=[f"{c[0]}-{c[-1]}" for c in LOGPROBS_CASES],
)
def test_logprobs_matches_oracle(backend, gen, narrow_tiles, dtype, vocab, ignored, bias, temperature, softcap, scale,
                                 outputs, path):
    name, device = backend
    n, d = (33, 17) if dtype == torch.float64 else (96, 37)  # fp64: the rule's bound is its floor (naive == truth)
    h0, w0, b0 = make_head(n, d, vocab, dtype=torch.float64, bias=bias, gen=gen)
    transform = dict(temperature=temperature, softcap=softcap, logit_scale=scale)
    # is_top1 is exact, so it is judged on the inputs the backend sees (rounded to ``dtype``), in fp64
    seen = [None if t is None else t.to(dtype).double() for t in (h0, w0, b0)]
    labels = _argmax_labels(make_labels(n, vocab, ignored=ignored, gen=gen), *seen, gen, **transform)
    g_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    with_entropy = "entropy" in outputs

    def run(fn, cast_dtype, dev="cpu", **extra):
        h, w, b = (_leaf(t, cast_dtype, dev) for t in (h0, w0, b0))
        out = fn(h, w, labels.to(dev), b, **transform, outputs=outputs, **extra)
        out = dict(out._asdict()) if isinstance(out, tuple) else (out if isinstance(out, dict) else {"logp": out})
        loss = (out["logp"].double() * g_logp.to(dev)).sum()
        if with_entropy:
            loss = loss + (out["entropy"].double() * g_ent.to(dev)).sum()
        loss.backward()
        return {k: v.detach().cpu() for k, v in out.items() if v is not None}, _grads([h, w, b])

    with _path(backend, path, n, vocab, d, dtype, 1, "logprobs_bwd"):
        got, grads = run(fastpref.linear_logprobs, dtype, device, backend=name)
    naive, n_grads = run(reference.linear_logprobs, dtype, precision="native")
    truth, t_grads = run(reference.linear_logprobs, torch.float64, precision="fp64")
    print()
    out_ulps = 1 if name == "cuda" else 0
    assert got["logp"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got["logp"].shape == (n,)
    for out_name in ("logp",) + tuple(o for o in outputs if o != "is_top1"):
        assert_accurate(out_name, got[out_name], naive[out_name], truth[out_name], dtype, out_ulps=out_ulps)
    if "is_top1" in outputs:
        top1 = reference.linear_logprobs(*seen[:2], labels, seen[2], **transform, outputs=("is_top1",))["is_top1"]
        assert got["is_top1"].dtype == torch.bool
        assert torch.equal(got["is_top1"], top1), "is_top1 differs from the fp64 oracle on the same inputs"
        assert top1.any() and not top1.all(), "the case needs rows whose label is the argmax and rows where not"
    _check_grads(grads, n_grads, t_grads, dtype, out_ulps)
    ignored_rows = labels == -100
    assert torch.all(got["logp"][ignored_rows] == 0) and torch.all(grads[0][ignored_rows] == 0)
    if with_entropy:
        assert torch.all(got["entropy"][ignored_rows] == 0)


# --------------------------------------------------------------------------- linear_divergence

DIVERGENCE_CASES = [
    # id, dtype, kind, beta, V, ignored, biases, temperature, (s_softcap, t_softcap), (s_scale, t_scale),
    # labels?, entropy?, backward path (PATHS)
    ("fkl-fp32-V123-ign20-entropy", torch.float32, "forward_kl", 0.5, 123, 0.2, False, 1.0, (None, None),
     (1.0, 1.0), True, True, "cache"),
    ("rkl-fp32-V1000-bias-T0.8-scales", torch.float32, "reverse_kl", 0.5, 1000, 0.2, True, 0.8, (None, None),
     (1.3, 0.7), True, True, "recompute"),
    ("jsd0.3-fp32-V1000-bias", torch.float32, "jsd", 0.3, 1000, 0.2, True, 1.0, (None, None), (1.0, 1.5),
     True, False, "cache-chunks"),
    ("jsd0.5-fp32-V123-softcaps-nolabels", torch.float32, "jsd", 0.5, 123, 0.0, False, 1.0, (4.0, 6.0),
     (2.0, 1.0), False, True, "recompute"),
    ("rkl-fp32-V1000-softcap", torch.float32, "reverse_kl", 0.5, 1000, 0.2, True, 1.0, (5.0, None),
     (1.0, 1.0), True, False, "cache-chunks"),
    ("fkl-bf16-V1000-bias-entropy", torch.bfloat16, "forward_kl", 0.5, 1000, 0.2, True, 1.0, (None, None),
     (0.8, 1.2), True, True, "cache"),
    ("jsd0.7-bf16-V123-ign100", torch.bfloat16, "jsd", 0.7, 123, 1.0, False, 1.0, (None, None), (1.0, 1.0),
     True, True, "recompute"),
    ("rkl-bf16-V1000", torch.bfloat16, "reverse_kl", 0.5, 1000, 0.2, True, 1.0, (None, 8.0),
     (1.0, 1.0), True, True, "recompute-chunks"),
    ("fkl-fp64-V123-ign20-softcap", torch.float64, "forward_kl", 0.5, 123, 0.2, False, 1.0, (3.0, 3.0),
     (1.0, 1.0), True, True, "cache"),
    ("rkl-fp64-V123-ign20-softcap", torch.float64, "reverse_kl", 0.5, 123, 0.2, False, 1.0, (3.0, 3.0),
     (1.0, 1.0), True, False, "recompute"),
    ("jsd0.3-fp64-V123-ign20-softcap", torch.float64, "jsd", 0.3, 123, 0.2, False, 1.0, (3.0, 3.0),
     (1.0, 1.0), True, True, "cache"),
]


@pytest.mark.parametrize(
    "dtype,kind,beta,vocab,ignored,biases,temperature,softcaps,scales,with_labels,entropy,path",
    [c[1:] for c in DIVERGENCE_CASES], ids=[f"{c[0]}-{c[-1]}" for c in DIVERGENCE_CASES],
)
def test_divergence_matches_oracle(backend, gen, narrow_tiles, dtype, kind, beta, vocab, ignored, biases, temperature,
                                   softcaps, scales, with_labels, entropy, path):
    name, device = backend
    n, ds, dt = (40, 24, 24) if dtype == torch.float64 else (96, 37, 50)  # fp64: as test_logprobs_matches_oracle
    hs0, ws0, bs0 = make_head(n, ds, vocab, dtype=torch.float64, bias=biases, gen=gen)
    ht0, wt0, bt0 = make_head(n, dt, vocab, dtype=torch.float64, bias=biases, gen=gen)
    labels = make_labels(n, vocab, ignored=ignored, gen=gen) if with_labels else None
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    kw = dict(kind=kind, beta=beta, temperature=temperature, student_softcap=softcaps[0],
              teacher_softcap=softcaps[1], student_logit_scale=scales[0], teacher_logit_scale=scales[1],
              return_entropy=entropy)

    def run(fn, cast_dtype, dev="cpu", **extra):
        hs, w, bs = (_leaf(t, cast_dtype, dev) for t in (hs0, ws0, bs0))
        ht, wt, bt = (_leaf(t, cast_dtype, dev, requires_grad=False) for t in (ht0, wt0, bt0))
        lab = None if labels is None else labels.to(dev)
        out = fn(hs, w, ht, wt, lab, student_bias=bs, teacher_bias=bt, **kw, **extra)
        div, ent = out if entropy else (out, None)
        (div.double() * g.to(dev)).sum().backward()
        assert ent is None or not ent.requires_grad
        return div.detach().cpu(), None if ent is None else ent.cpu(), _grads([hs, w, bs])

    with _path(backend, path, n, vocab, ds, dtype, 2, "divergence_bwd"):
        div, ent, grads = run(fastpref.linear_divergence, dtype, device, backend=name)
    n_div, n_ent, n_grads = run(reference.linear_divergence, dtype, precision="native")
    t_div, t_ent, t_grads = run(reference.linear_divergence, torch.float64, precision="fp64")
    print()
    out_ulps = 1 if name == "cuda" else 0
    assert div.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and div.shape == (n,)
    assert_accurate(kind, div, n_div, t_div, dtype, out_ulps=out_ulps)
    if entropy:
        assert_accurate("entropy", ent, n_ent, t_ent, dtype, out_ulps=out_ulps)
    _check_grads(grads, n_grads, t_grads, dtype, out_ulps)
    if labels is not None:
        ignored_rows = labels == -100
        assert torch.all(div[ignored_rows] == 0) and torch.all(grads[0][ignored_rows] == 0)


# --------------------------------------------------------------------------- frozen heads


def test_logprobs_frozen_head_gets_no_gradient(backend, gen):
    """A head without ``requires_grad``: no gradient for it, and ``d hidden`` by the accuracy rule."""
    name, device = backend
    h0, w0, b0 = make_head(96, 37, 1000, dtype=torch.float64, bias=True, gen=gen)
    labels = make_labels(96, 1000, ignored=0.2, gen=gen)
    g = torch.randn(96, generator=gen)
    d_hidden = {}
    for key, fn, dtype, dev, extra in (
        ("backend", fastpref.linear_logprobs, torch.float32, device, dict(backend=name)),
        ("naive", reference.linear_logprobs, torch.float32, "cpu", dict(precision="native")),
        ("truth", reference.linear_logprobs, torch.float64, "cpu", {}),
    ):
        h, w, b = _leaf(h0, dtype, dev), _leaf(w0, dtype, dev, False), _leaf(b0, dtype, dev, False)
        (fn(h, w, labels.to(dev), b, **extra) * g.to(device=dev, dtype=dtype)).sum().backward()
        assert w.grad is None and b.grad is None
        d_hidden[key] = h.grad.cpu()
    assert_accurate("d_hidden", d_hidden["backend"], d_hidden["naive"], d_hidden["truth"], torch.float32)


def test_divergence_frozen_student_head(backend, gen):
    name, device = backend
    hs0, ws0, _ = make_head(96, 37, 1000, dtype=torch.float64, gen=gen)
    ht0, wt0, _ = make_head(96, 50, 1000, dtype=torch.float64, gen=gen)
    g = torch.randn(96, generator=gen)
    d_hidden = {}
    for key, fn, dtype, dev, extra in (
        ("backend", fastpref.linear_divergence, torch.float32, device, dict(backend=name)),
        ("naive", reference.linear_divergence, torch.float32, "cpu", dict(precision="native")),
        ("truth", reference.linear_divergence, torch.float64, "cpu", {}),
    ):
        h, w = _leaf(hs0, dtype, dev), _leaf(ws0, dtype, dev, False)
        ht, wt = ht0.to(device=dev, dtype=dtype), wt0.to(device=dev, dtype=dtype)
        (fn(h, w, ht, wt, kind="reverse_kl", **extra) * g.to(device=dev, dtype=dtype)).sum().backward()
        assert w.grad is None
        d_hidden[key] = h.grad.cpu()
    assert_accurate("d_hidden", d_hidden["backend"], d_hidden["naive"], d_hidden["truth"], torch.float32)
