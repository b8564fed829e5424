"""The CUDA C++ backend (csrc/ + fastpref/backends/cuda_ops.py).

Runs everywhere: ``nvcc -c`` of the device code (no torch headers) for sm_80 / sm_90; the
backend's "why not" on CPU; the op schemas of csrc/fastpref_api.cpp under ``opcheck`` with a
Python model of the four epilogue kernels as their CPU kernel; and the chunking / GEMM /
accumulation logic of cuda_ops.py against the fp64 oracle with that model standing in for the
kernels (split vocabulary, split rows, bf16 tiles, every divergence kind).

Runs on a GPU only (``-m gpu``): the real kernels against the same model on odd shapes,
strides and alignments; ``opcheck`` of the real ops; the public API with ``backend="cuda"``
against the oracle (the accuracy rule of docs/design.md §6).
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_accurate as _assert_accurate
from conftest import floor_for, make_head, make_labels

import fastpref as fp
from fastpref import reference as ref
from fastpref.backends import cuda_ops

CSRC = cuda_ops.csrc_dir()
KINDS = {"forward_kl": cuda_ops.FORWARD_KL, "reverse_kl": cuda_ops.REVERSE_KL, "jsd": cuda_ops.JSD}
HAS_GPU = torch.version.cuda is not None and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA build of torch and a CUDA GPU")


@contextlib.contextmanager
def workspace(nbytes):
    old = fp.get_workspace_bytes()
    fp.set_workspace_bytes(nbytes)
    try:
        yield
    finally:
        fp.set_workspace_bytes(old)


def assert_accurate(name, out, naive, truth, dtype):
    """The accuracy rule (docs/design.md §6); a bf16/fp16 *output* also gets one ulp of its own dtype on the floor
    (a correctly rounded result may sit a full ulp from the truth when naive was lucky)."""
    if dtype in (torch.bfloat16, torch.float16) and truth.numel():
        scale = truth.abs().max().item()
        ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(scale, 1e-30)))
        err = (out.double() - truth.double()).abs().max().item()
        err_naive = (naive.double() - truth.double()).abs().max().item()
        bound = 2 * err_naive + floor_for(truth, dtype) + ulp
        print(f"{name}: err={err:.3e} naive_err={err_naive:.3e} bound={bound:.3e} (incl. 1 {dtype} ulp)")
        assert torch.isfinite(out).all(), f"{name}: non-finite output"
        assert err <= bound, f"{name}: err {err:.3e} > bound {bound:.3e} (naive err {err_naive:.3e})"
        return
    _assert_accurate(name, out, naive, truth, dtype)


# =========================================================================== compile-only (no GPU)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_epilogue(arch, tmp_path):
    """csrc/epilogue.cu (no torch headers) compiles for the GPUs we ship to."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [
        nvcc, "-std=c++17", "-O3", "--use_fast_math", "-lineinfo", f"-gencode=arch=compute_{arch[3:]},code={arch}",
        "-Werror", "all-warnings", "-c", str(CSRC / "epilogue.cu"), "-o", str(tmp_path / f"epilogue_{arch}.o"),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print(f"{' '.join(cmd)}\n-> rc={proc.returncode} in {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr}"


@pytest.mark.slow
def test_host_api_compiles_against_torch_headers(tmp_path):
    """csrc/fastpref_api.cpp against the installed torch's headers (~25 s; no link: no libc10_cuda here)."""
    import sysconfig

    from torch.utils import cpp_extension

    cxx, cuda_inc = shutil.which("g++") or shutil.which("c++"), Path("/usr/local/cuda/include")
    if cxx is None or not (cuda_inc / "cuda_runtime_api.h").exists():
        pytest.skip("needs g++ and the CUDA runtime headers")
    standin = tmp_path / "c10" / "cuda" / "impl"
    standin.mkdir(parents=True)
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in cpp_extension.include_paths()):
        (standin / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [str(tmp_path), *cpp_extension.include_paths(), str(cuda_inc), sysconfig.get_paths()["include"]]
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-Wall", "-Wextra", "-Werror",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}", "-DTORCH_EXTENSION_NAME=fastpref_cuda",
           *[a for inc in incs for a in ("-isystem", inc)], "-c", str(CSRC / "fastpref_api.cpp"),
           "-o", str(tmp_path / "api.o")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    print(f"-> rc={proc.returncode} in {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, f"g++ failed:\n{proc.stderr[-6000:]}"


def test_cuda_backend_reports_why_not_on_cpu():
    reason = fp.available_backends(torch.device("cpu"))["cuda"]
    assert isinstance(reason, str) and reason, reason
    with pytest.raises(RuntimeError, match="cuda"):
        fp.linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), backend="cuda")


def test_csrc_files_open_with_a_summary():
    for name in ("fastpref_params.h", "epilogue.cuh", "epilogue.cu", "fastpref_api.cpp"):
        head = (CSRC / name).read_text().splitlines()[:3]
        assert all(line.startswith("//") for line in head), f"{name} must open with what it fuses and why"
        if name != "fastpref_api.cpp":
            assert "torch" not in "".join(
                line for line in (CSRC / name).read_text().splitlines() if line.startswith("#include")
            ), f"{name} must not include torch headers"


# =========================================================================== a Python model of the kernels
#
# Same contract as the fastpref_cuda ops (csrc/fastpref_api.cpp): same arguments, writes into the
# same (a!) tensors, fp32 math.  Written from the kernel specification, with torch ops.


def _transform(u, bias, temperature, softcap):
    z = u.float()
    if bias is not None:
        z = z + bias
    z = z * (1.0 / temperature)
    if softcap > 0:
        z = softcap * torch.tanh(z * (1.0 / softcap))
    return z


def _chain(d, z, temperature, softcap):
    if softcap > 0:
        d = d * (1.0 - (z * (1.0 / softcap)) ** 2)
    return d * (1.0 / temperature)


def _online(z, x):
    m = z.amax(1)
    e = torch.exp(z - m[:, None])
    return m, e.sum(1), (e * x).sum(1)


def _merge(a, b):
    m = torch.maximum(a[0], b[0])
    ra, rb = torch.exp(a[0] - m), torch.exp(b[0] - m)
    return m, a[1] * ra + b[1] * rb, a[2] * ra + b[2] * rb


def _online_ent(z):
    """(max, sum e^{z-m}, sum e^{z-m} (z-m)): the logprobs state, centred on the row max."""
    m = z.amax(1)
    d = z - m[:, None]
    e = torch.exp(d)
    return m, e.sum(1), (e * d).sum(1)


def _merge_ent(a, b):
    m = torch.maximum(a[0], b[0])
    ra, rb = torch.exp(a[0] - m), torch.exp(b[0] - m)
    ta = torch.where(a[1] > 0, ra * (a[2] + (a[0] - m) * a[1]), torch.zeros_like(m))
    tb = torch.where(b[1] > 0, rb * (b[2] + (b[0] - m) * b[1]), torch.zeros_like(m))
    return m, a[1] * ra + b[1] * rb, ta + tb


def _nan_like(t):
    return torch.full_like(t, float("nan"))


def emu_logprobs_stats_fwd(logits, labels, bias, state, logp, entropy, lse, col0, vocab, ignore_index, temperature,
                           softcap, first_tile, last_tile):
    z = _transform(logits, bias, temperature, softcap)
    cols = z.shape[1]
    acc = _online_ent(z)
    local = labels - col0
    inside = (local >= 0) & (local < cols)
    target = torch.where(inside, z.gather(1, local.clamp(0, cols - 1)[:, None])[:, 0], torch.zeros_like(acc[0]))
    if not first_tile:
        acc = _merge_ent((state[:, 0], state[:, 1], state[:, 2]), acc)
        target = target + state[:, 3]
    if not last_tile:
        state.copy_(torch.stack([acc[0], acc[1], acc[2], target], 1))
        return
    lse_v = acc[0] + torch.log(acc[1])
    lse.copy_(lse_v)
    keep, in_range = labels != ignore_index, (labels >= 0) & (labels < vocab)
    zero = torch.zeros_like(lse_v)
    logp.copy_(torch.where(keep, torch.where(in_range, target - lse_v, _nan_like(lse_v)), zero))
    if entropy.numel():
        ent = torch.log(acc[1]) - acc[2] / acc[1]
        entropy.copy_(torch.where(keep, torch.where(in_range, ent, _nan_like(ent)), zero))


def emu_logprobs_grad_tile(logits, dz_out, labels, bias, grad_logp, grad_entropy, lse, entropy, col0, vocab,
                           ignore_index, temperature, softcap):
    z = _transform(logits, bias, temperature, softcap)
    cols = z.shape[1]
    keep, in_range = labels != ignore_index, (labels >= 0) & (labels < vocab)
    g = torch.where(in_range, grad_logp, _nan_like(grad_logp))[:, None]
    p = torch.exp(z - lse[:, None])
    if grad_entropy is not None:
        d = -p * (g + grad_entropy[:, None] * (z - (lse - entropy)[:, None]))
    else:
        d = -p * g
    onehot = torch.arange(cols, device=z.device)[None, :] == (labels - col0)[:, None]
    d = d + torch.where(onehot, g, torch.zeros_like(d))
    d = _chain(d, z, temperature, softcap)
    d = torch.where(keep[:, None], d, torch.zeros_like(d))
    (logits if dz_out is None else dz_out).copy_(d)


def emu_divergence_stats_fwd(s_logits, t_logits, labels, s_bias, t_bias, state, div, stats, ignore_index, kind,
                             beta, temperature, s_softcap, t_softcap, pass_, first_tile, last_tile):
    zs = _transform(s_logits, s_bias, temperature, s_softcap)
    zt = _transform(t_logits, t_bias, temperature, t_softcap)
    keep = torch.ones(zs.shape[0], dtype=torch.bool, device=zs.device) if labels is None else labels != ignore_index
    zero = torch.zeros(zs.shape[0], device=zs.device)
    if pass_ == 0:
        a_s = _online(zs, zs - zt if kind == cuda_ops.REVERSE_KL else torch.zeros_like(zs))
        a_t = _online(zt, zt - zs if kind == cuda_ops.FORWARD_KL else torch.zeros_like(zt))
        if not first_tile:
            a_s = _merge((state[:, 0], state[:, 1], state[:, 2]), a_s)
            a_t = _merge((state[:, 3], state[:, 4], state[:, 5]), a_t)
        if not last_tile:
            state[:, :6].copy_(torch.stack([*a_s, *a_t], 1))
            return
        lse_s, lse_t = a_s[0] + torch.log(a_s[1]), a_t[0] + torch.log(a_t[1])
        stats[:, 0], stats[:, 1] = lse_s, lse_t
        if kind == cuda_ops.FORWARD_KL:
            stats[:, 2] = 0
            div.copy_(torch.where(keep, a_t[2] / a_t[1] - lse_t + lse_s, zero))
        elif kind == cuda_ops.REVERSE_KL:
            kl = a_s[2] / a_s[1] - lse_s + lse_t
            stats[:, 2] = kl
            div.copy_(torch.where(keep, kl, zero))
        return
    log_ps, log_pt = zs - stats[:, :1], zt - stats[:, 1:2]
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(1)
    if not first_tile:
        kl_t, kl_s = kl_t + state[:, 6], kl_s + state[:, 7]
    if not last_tile:
        state[:, 6], state[:, 7] = kl_t, kl_s
        return
    stats[:, 2] = kl_s
    div.copy_(torch.where(keep, beta * kl_t + (1 - beta) * kl_s, zero))


def emu_divergence_grad_tile(s_logits, dz_out, t_logits, labels, s_bias, t_bias, grad, stats, ignore_index, kind, beta,
                             temperature, s_softcap, t_softcap):
    zs = _transform(s_logits, s_bias, temperature, s_softcap)
    zt = _transform(t_logits, t_bias, temperature, t_softcap)
    log_ps, log_pt = zs - stats[:, :1], zt - stats[:, 1:2]
    ps, g, aux = log_ps.exp(), grad[:, None], stats[:, 2:3]
    if kind == cuda_ops.FORWARD_KL:
        d = g * (ps - log_pt.exp())
    elif kind == cuda_ops.REVERSE_KL:
        d = g * ps * (log_ps - log_pt - aux)
    else:
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        d = g * (1 - beta) * ps * (log_ps - log_m - aux)
    d = _chain(d, zs, temperature, s_softcap)
    if labels is not None:
        d = torch.where((labels != ignore_index)[:, None], d, torch.zeros_like(d))
    (s_logits if dz_out is None else dz_out).copy_(d)


EMULATED = SimpleNamespace(
    logprobs_stats_fwd=emu_logprobs_stats_fwd,
    logprobs_grad_tile=emu_logprobs_grad_tile,
    divergence_stats_fwd=emu_divergence_stats_fwd,
    divergence_grad_tile=emu_divergence_grad_tile,
)


@pytest.fixture
def emulated_kernels(monkeypatch):
    """cuda_ops with the Python model in place of the compiled epilogue ops (CPU tensors)."""
    monkeypatch.setattr(cuda_ops, "_load_extension", lambda: EMULATED)
    return cuda_ops


# =========================================================================== schemas (no GPU)


def _schemas() -> dict:
    text = (CSRC / "fastpref_api.cpp").read_text()
    block = text[text.index("TORCH_LIBRARY(fastpref_cuda, m)"):]
    block = block[: block.index("\n}\n")]
    out = {}
    for chunk in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\);", block):
        schema = "".join(re.findall(r"\"([^\"]*)\"", chunk))
        out[schema[: schema.index("(")]] = schema
    return out


def _tile_args(n=5, c=7, col0=3, vocab=13, device="cpu", gen=None, dtype=torch.float32, entropy=True):
    g = gen
    logits = (torch.randn(n, c, generator=g) * 3).to(dtype).to(device)
    labels = torch.randint(col0 - 2, col0 + c + 2, (n,), generator=g)
    labels[0] = -100
    labels = labels.clamp(min=-100).to(device)
    bias = torch.randn(c, generator=g).to(device)
    f = dict(dtype=torch.float32, device=device)
    return SimpleNamespace(
        logits=logits, labels=labels, bias=bias, col0=col0, vocab=vocab,
        state=torch.randn(n, cuda_ops.LOGPROBS_STATE_WIDTH, generator=g).to(device).abs(),
        logp=torch.empty(n, **f), entropy=torch.empty(n if entropy else 0, **f), lse=torch.empty(n, **f),
        grad=torch.randn(n, generator=g).to(device), grad_ent=torch.randn(n, generator=g).to(device),
        lse_in=(logits.float().logsumexp(1) + 0.5), ent_in=torch.rand(n, generator=g).to(device) + 1,
        t_logits=(torch.randn(n, c, generator=g) * 3).to(dtype).to(device), t_bias=torch.randn(c, generator=g).to(device),
        dstate=torch.randn(n, cuda_ops.DIVERGENCE_STATE_WIDTH, generator=g).to(device).abs(),
        div=torch.empty(n, **f), stats=torch.cat([torch.randn(n, 2, generator=g) + 4, torch.rand(n, 1, generator=g)], 1).to(device),
    )


def _op_samples(ops, device="cpu", gen=None):
    """(op, args) pairs covering first/middle/last tiles, entropy, dz_out and every kind."""
    a = _tile_args(device=device, gen=gen)
    samples = []
    for first, last in [(True, True), (True, False), (False, False), (False, True)]:
        samples.append((ops.logprobs_stats_fwd, (a.logits, a.labels, a.bias, a.state.clone(), a.logp, a.entropy, a.lse,
                                                 a.col0, a.vocab, -100, 0.7, 5.0 if first else 0.0, first, last)))
    for dz_out in (None, torch.empty_like(a.logits)):
        samples.append((ops.logprobs_grad_tile, (a.logits.clone(), dz_out, a.labels, a.bias, a.grad, a.grad_ent,
                                                 a.lse_in, a.ent_in, a.col0, a.vocab, -100, 1.3, 0.0)))
    samples.append((ops.logprobs_grad_tile, (a.logits.clone(), None, a.labels, None, a.grad, None, a.lse_in, None,
                                             a.col0, a.vocab, -100, 1.0, 3.0)))
    for kind in (0, 1, 2):
        for pass_ in ((0, 1) if kind == 2 else (0,)):
            for first, last in [(True, True), (False, True), (True, False)]:
                samples.append((ops.divergence_stats_fwd, (
                    a.logits, a.t_logits, a.labels, a.bias, None, a.dstate.clone(), a.div, a.stats.clone(), -100, kind,
                    0.3, 0.9, 0.0, 4.0, pass_, first, last)))
        samples.append((ops.divergence_grad_tile, (a.logits.clone(), None, a.t_logits, a.labels, a.bias, a.t_bias,
                                                   a.grad, a.stats, -100, kind, 0.3, 1.1, 6.0, 0.0)))
    return samples


def test_op_schemas_pass_opcheck_with_the_python_model(gen):
    """The C++ schemas (parsed from fastpref_api.cpp) with cuda_ops' fake kernels pass opcheck on CPU."""
    schemas = _schemas()
    assert set(schemas) == set(cuda_ops.EPILOGUE_OPS), schemas
    ns = "fastpref_cuda_schema_check"
    lib = torch.library.Library(ns, "FRAGMENT")
    for name, schema in schemas.items():
        lib.define(schema)
        lib.impl(name, getattr(EMULATED, name), "CPU")
        torch.library.register_fake(f"{ns}::{name}", lib=lib)(cuda_ops._fake_epilogue)
    ops = getattr(torch.ops, ns)
    for op, args in _op_samples(ops, gen=gen):
        torch.library.opcheck(op.default, args)


# =========================================================================== cuda_ops orchestration on CPU


LOGPROB_CASES = [
    # id, N, D, V, dtype, ignored, bias, temperature, softcap, workspace
    ("V123-fp32", 40, 24, 123, torch.float32, 0.0, False, 1.0, None, None),
    ("V123-fp32-ign20-bias-temp0.7-softcap5", 40, 24, 123, torch.float32, 0.2, True, 0.7, 5.0, None),
    ("V3001-fp32-vocab-split-rows-split", 45, 16, 3001, torch.float32, 0.2, True, 1.0, None, 2**16),
    ("V3001-bf16-vocab-split-softcap", 45, 16, 3001, torch.bfloat16, 0.2, True, 1.3, 8.0, 2**16),
    ("V123-bf16-all-ignored", 17, 16, 123, torch.bfloat16, 1.0, False, 1.0, None, None),
]


def _legacy_cap(cap, temp):
    """The epilogues' own parameters ``(temperature T, softcap c)`` compute ``c tanh(u / (T c))``: the
    contract's transform (docs/design.md §2.1) with temperature ``T`` and softcap ``c T``."""
    return None if cap is None else cap * temp


def _logprobs_check(fwd, bwd, case, with_entropy, gen, device="cpu"):
    _, n, d, v, dtype, ignored, has_bias, temp, cap, ws = case
    h, w, b = make_head(n, d, v, dtype=dtype, bias=has_bias, gen=gen)
    labels = make_labels(n, v, ignored=ignored, gen=gen)
    g_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    h, w, labels = h.to(device), w.to(device), labels.to(device)
    b = None if b is None else b.to(device)
    g_logp, g_ent = g_logp.to(device), g_ent.to(device)

    def oracle(precision):
        leaves = [None if t is None else t.detach().requires_grad_() for t in (h, w, b)]
        lp, ent = ref.linear_logprobs(leaves[0], leaves[1], labels, leaves[2], temperature=temp,
                                      softcap=_legacy_cap(cap, temp), return_entropy=True, precision=precision)
        loss = (lp.double() * g_logp).sum() + ((ent.double() * g_ent).sum() if with_entropy else 0)
        grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
        return lp.detach(), ent.detach(), grads

    truth_lp, truth_ent, truth_grads = oracle("fp64")
    naive_lp, naive_ent, naive_grads = oracle("native")
    with workspace(ws) if ws else contextlib.nullcontext():
        lp, ent, lse = fwd(h, w, labels, b, -100, temp, cap, with_entropy)
        grads = bwd(g_logp.float(), g_ent.float() if with_entropy else None, h, w, labels, b, lse,
                    ent if with_entropy else None, -100, temp, cap, True, True, b is not None)
    assert lp.dtype == torch.float32 and lse.shape == (n,)
    assert_accurate("logp", lp, naive_lp, truth_lp, dtype)
    if with_entropy:
        assert_accurate("entropy", ent, naive_ent, truth_ent, dtype)
    else:
        assert ent.numel() == 0
    for name, got, naive, truth in zip(("d_hidden", "d_weight", "d_bias"), grads, naive_grads, truth_grads):
        assert got.dtype == dtype and got.shape == truth.shape
        assert_accurate(name, got.float(), naive.float(), truth, dtype)


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("case", LOGPROB_CASES, ids=[c[0] for c in LOGPROB_CASES])
def test_orchestration_logprobs_with_python_kernels(emulated_kernels, case, with_entropy, gen):
    _logprobs_check(emulated_kernels.logprobs_fwd, emulated_kernels.logprobs_bwd, case, with_entropy, gen)


DIVERGENCE_CASES = [
    # id, N, Ds, Dt, V, s dtype, t dtype, ignored, bias, temperature, s softcap, t softcap, workspace
    ("V123-fp32", 40, 24, 20, 123, torch.float32, torch.float32, 0.0, False, 1.0, None, None, None),
    ("V123-fp32-ign20-bias-temp1.5-caps", 40, 24, 20, 123, torch.float32, torch.float32, 0.2, True, 1.5, 6.0, 4.0, None),
    ("V3001-fp32-vocab-split", 45, 16, 12, 3001, torch.float32, torch.float32, 0.2, True, 0.8, None, 5.0, 2**16),
    ("V3001-bf16-fp32teacher-vocab-split", 45, 16, 12, 3001, torch.bfloat16, torch.float32, 0.2, False, 1.0, 8.0, None,
     2**16),
]


def _divergence_check(fwd, bwd, case, kind, gen, device="cpu"):
    _, n, ds, dt, v, sdt, tdt, ignored, has_bias, temp, s_cap, t_cap, ws = case
    hs, wsh, bs = make_head(n, ds, v, dtype=sdt, bias=has_bias, gen=gen)
    ht, wt, bt = make_head(n, dt, v, dtype=tdt, bias=has_bias, gen=gen)
    labels = make_labels(n, v, ignored=ignored, gen=gen)
    grad = torch.randn(n, generator=gen, dtype=torch.float64)
    mv = [None if t is None else t.to(device) for t in (hs, wsh, bs, ht, wt, bt, labels, grad)]
    hs, wsh, bs, ht, wt, bt, labels, grad = mv
    beta = 0.3

    def oracle(precision):
        leaves = [None if t is None else t.detach().requires_grad_() for t in (hs, wsh, bs)]
        div = ref.linear_divergence(leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2], teacher_bias=bt,
                                    kind=kind, beta=beta, temperature=temp, student_softcap=_legacy_cap(s_cap, temp),
                                    teacher_softcap=_legacy_cap(t_cap, temp), precision=precision)
        grads = torch.autograd.grad((div.double() * grad).sum(), [t for t in leaves if t is not None])
        return div.detach(), grads

    truth, truth_grads = oracle("fp64")
    naive, naive_grads = oracle("native")
    with workspace(ws) if ws else contextlib.nullcontext():
        div, stats = fwd(hs, wsh, ht, wt, labels, bs, bt, -100, KINDS[kind], beta, temp, s_cap, t_cap)
        grads = bwd(grad.float(), hs, wsh, ht, wt, labels, bs, bt, stats, -100, KINDS[kind], beta, temp, s_cap, t_cap,
                    True, True, bs is not None)
    assert stats.shape == (n, 3) and stats.dtype == torch.float32
    assert_accurate(f"{kind}", div, naive, truth, sdt)
    for name, got, nv, tr in zip(("d_hidden", "d_weight", "d_bias"), grads, naive_grads, truth_grads):
        assert got.dtype == sdt and got.shape == tr.shape
        assert_accurate(f"{kind} {name}", got.float(), nv.float(), tr, sdt)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=[c[0] for c in DIVERGENCE_CASES])
def test_orchestration_divergence_with_python_kernels(emulated_kernels, case, kind, gen):
    _divergence_check(emulated_kernels.divergence_fwd, emulated_kernels.divergence_bwd, case, kind, gen)


def test_orchestration_frozen_head_and_plan(emulated_kernels, gen):
    h, w, _ = make_head(9, 8, 50, gen=gen)
    labels = make_labels(9, 50, gen=gen)
    lp, _, lse = cuda_ops.logprobs_fwd(h, w, labels, None, -100, 1.0, None, False)
    dh, dw, db = cuda_ops.logprobs_bwd(torch.ones(9), None, h, w, labels, None, lse, None, -100, 1.0, None,
                                       True, False, False)
    assert dw is None and db is None and dh.shape == h.shape
    with workspace(2**16):
        rows, cols = cuda_ops._plan(10_000, 128_256, 6, 4096 * 4)
    assert cols % 128 == 0 and cols < 128_256 and rows >= 1
    rows, cols = cuda_ops._plan(100, 123, 4, 0)
    assert (rows, cols) == (100, 123)


# =========================================================================== on a GPU

GPU_LOGPROB_CASES = LOGPROB_CASES + [
    ("V32001-bf16-ign20-bias", 63, 64, 32001, torch.bfloat16, 0.2, True, 1.0, None, None),
    ("V50257-fp16-softcap30", 40, 64, 50257, torch.float16, 0.2, False, 0.9, 30.0, None),
    ("V32001-fp32-vocab-split", 70, 48, 32001, torch.float32, 0.2, True, 1.0, 10.0, 2**20),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("case", GPU_LOGPROB_CASES, ids=[c[0] for c in GPU_LOGPROB_CASES])
def test_gpu_backend_logprobs_matches_oracle(case, with_entropy, gen):
    _logprobs_check(cuda_ops.logprobs_fwd, cuda_ops.logprobs_bwd, case, with_entropy, gen, device="cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=[c[0] for c in DIVERGENCE_CASES])
def test_gpu_backend_divergence_matches_oracle(case, kind, gen):
    _divergence_check(cuda_ops.divergence_fwd, cuda_ops.divergence_bwd, case, kind, gen, device="cuda")


@pytest.mark.gpu
@needs_gpu
def test_gpu_public_api_through_autograd(gen):
    h, w, b = make_head(33, 32, 501, dtype=torch.bfloat16, bias=True, gen=gen)
    labels = make_labels(33, 501, ignored=0.2, gen=gen)
    h, w, b, labels = h.cuda().requires_grad_(), w.cuda().requires_grad_(), b.cuda().requires_grad_(), labels.cuda()
    lp, ent = fp.linear_logprobs(h, w, labels, b, return_entropy=True, backend="cuda")
    (lp.sum() + 0.1 * ent.sum()).backward()
    lp_t, ent_t = fp.linear_logprobs(h.detach(), w.detach(), labels, b.detach(), return_entropy=True, backend="torch")
    assert torch.allclose(lp, lp_t, atol=0.15) and torch.allclose(ent, ent_t, atol=0.15)
    assert h.grad is not None and w.grad is not None and b.grad is not None
    assert torch.all(h.grad[labels == -100] == 0)
    div = fp.linear_divergence(h, w, h.detach() * 0.5, w.detach(), labels, kind="jsd", beta=0.4, backend="cuda")
    assert torch.all(div[labels == -100] == 0) and torch.isfinite(div).all()


@pytest.mark.gpu
@needs_gpu
def test_gpu_out_of_range_label_gives_nan_not_oob(gen):
    h, w, _ = make_head(6, 16, 77, gen=gen)
    labels = torch.tensor([0, 76, 77, -5, -100, 10**12])
    lp, ent, lse = cuda_ops.logprobs_fwd(h.cuda(), w.cuda(), labels.cuda(), None, -100, 1.0, None, True)
    lp = lp.cpu()
    assert torch.isfinite(lp[:2]).all() and torch.isnan(lp[2:4]).all() and lp[4] == 0 and torch.isnan(lp[5])
    torch.cuda.synchronize()


def _strided_tile(n, c, dtype, pad, offset, gen, device="cuda"):
    """A [n x c] view with row stride c + pad starting `offset` elements into its buffer."""
    buf = (torch.randn(n * (c + pad) + offset + 8, generator=gen) * 3).to(dtype).to(device)
    return buf[offset: offset + n * (c + pad)].view(n, c + pad)[:, :c]


def _same_layout(t):
    """A copy of ``t`` with the same strides and storage offset (so the same misalignment)."""
    base = torch.zeros(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=t.device)
    out = base.as_strided(t.shape, t.stride(), t.storage_offset())
    out.copy_(t)
    return out


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cols,pad,offset", [(1, 0, 0), (7, 0, 0), (123, 0, 1), (257, 3, 0), (1000, 5, 3),
                                             (4096, 0, 0), (32001, 1, 1)])
def test_gpu_kernels_match_python_model(dtype, cols, pad, offset, gen):
    """Each real epilogue op against the Python model, on odd widths, strides and misaligned rows."""
    _kernels_vs_model(cuda_ops.load(), dtype, cols, pad, offset, gen, "cuda")


def test_kernel_comparison_harness_on_cpu(gen):
    """The harness of the test above, model against itself on CPU (catches harness bugs here)."""
    _kernels_vs_model(EMULATED, torch.bfloat16, 123, 3, 1, gen, "cpu")


def _kernels_vs_model(ops, dtype, cols, pad, offset, gen, device):

    n, col0, vocab = 9, 5, cols + 11
    z = _strided_tile(n, cols, dtype, pad, offset, gen, device)
    zt = _strided_tile(n, cols, dtype, pad + 1, offset, gen, device)
    labels = torch.randint(col0 - 1, col0 + cols + 1, (n,), generator=gen)
    labels[1] = -100
    labels = labels.to(device)
    bias = torch.randn(cols, generator=gen).to(device)
    f = dict(dtype=torch.float32, device=device)
    for first, last in [(True, True), (True, False), (False, True)]:
        state0 = torch.cat([torch.randn(n, 1, generator=gen) + 8, torch.rand(n, 3, generator=gen) + 0.5], 1).to(device)
        outs = []
        for impl in (ops, EMULATED):
            state, logp, ent, lse = state0.clone(), torch.zeros(n, **f), torch.zeros(n, **f), torch.zeros(n, **f)
            impl.logprobs_stats_fwd(z, labels, bias, state, logp, ent, lse, col0, vocab, -100, 0.8, 7.0, first, last)
            outs.append((state, logp, ent, lse))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, equal_nan=True)
    stats = torch.cat([torch.randn(n, 2, generator=gen) + 9, torch.rand(n, 1, generator=gen)], 1).to(device)
    grad, g_ent = torch.randn(n, generator=gen).to(device), torch.randn(n, generator=gen).to(device)
    dz_dtypes = [dtype] + ([torch.bfloat16, torch.float16] if dtype == torch.float32 else [])
    for dz_dtype in dz_dtypes:
        tol = dict(rtol=2e-5, atol=2e-6) if dz_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
        res = []
        for impl in (ops, EMULATED):
            zz = _same_layout(z) if dz_dtype == dtype else z
            dz = None if dz_dtype == dtype else torch.empty(n, cols, dtype=dz_dtype, device=device)
            impl.logprobs_grad_tile(zz, dz, labels, bias, grad, g_ent, stats[:, 0].contiguous(), stats[:, 2] + 1, col0,
                                    vocab, -100,
                                    1.2, 5.0)
            res.append(zz if dz is None else dz)
        torch.testing.assert_close(res[0].float(), res[1].float(), **tol, equal_nan=True)
        for kind in (0, 1, 2):
            res = []
            for impl in (ops, EMULATED):
                zz = _same_layout(z) if dz_dtype == dtype else z
                dz = None if dz_dtype == dtype else torch.empty(n, cols, dtype=dz_dtype, device=device)
                impl.divergence_grad_tile(zz, dz, zt, labels, bias, None, grad, stats, -100, kind, 0.3, 0.9, 0.0, 6.0)
                res.append(zz if dz is None else dz)
            torch.testing.assert_close(res[0].float(), res[1].float(), **tol)
    for kind in (0, 1, 2):
        for pass_ in ((0, 1) if kind == 2 else (0,)):
            for first, last in [(True, True), (True, False), (False, True)]:
                st0 = torch.cat([torch.randn(n, 1, generator=gen) + 8, torch.rand(n, 2, generator=gen) + 0.5,
                                 torch.randn(n, 1, generator=gen) + 8, torch.rand(n, 4, generator=gen) + 0.5], 1).to(device)
                outs = []
                for impl in (ops, EMULATED):
                    state, div, sts = st0.clone(), torch.zeros(n, **f), stats.clone()
                    impl.divergence_stats_fwd(z, zt, labels, bias, None, state, div, sts, -100, kind, 0.3, 1.1, 4.0,
                                              0.0, pass_, first, last)
                    outs.append((state, div, sts))
                for a, b in zip(*outs):
                    torch.testing.assert_close(a, b, rtol=3e-5, atol=3e-5)


@pytest.mark.gpu
@needs_gpu
def test_gpu_opcheck_epilogue_ops(gen):
    ops = cuda_ops.load()
    for op, args in _op_samples(ops, device="cuda", gen=gen):
        torch.library.opcheck(op.default, args)


@pytest.mark.gpu
@needs_gpu
def test_gpu_opcheck_contract_ops(gen):
    h, w, b = make_head(20, 16, 300, dtype=torch.bfloat16, bias=True, gen=gen)
    labels = make_labels(20, 300, ignored=0.2, gen=gen)
    h, w, b, labels = h.cuda(), w.cuda(), b.cuda(), labels.cuda()
    ops = fp.backends.get_ops("cuda")
    torch.library.opcheck(ops.logprobs_fwd, (h, w, labels, b, -100, 1.0, None, True))
    _, ent, lse = ops.logprobs_fwd(h, w, labels, b, -100, 1.0, None, True)
    g = torch.randn(20, device="cuda")
    torch.library.opcheck(ops.logprobs_bwd, (g, g, h, w, labels, b, lse, ent, -100, 1.0, None, True, True, True))
    torch.library.opcheck(ops.divergence_fwd, (h, w, h * 0.5, w, labels, b, None, -100, 2, 0.5, 1.0, None, None))
