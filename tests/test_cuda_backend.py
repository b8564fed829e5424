"""The CUDA C++ backend (csrc/ + fastpref/backends/cuda_build.py + cuda_ops.py).

Runs everywhere:
* ``nvcc -c`` of the device code (no torch headers) for sm_80 / sm_90 with warnings as errors, and
  its ``ptxas -v`` report: no spills, no stack, registers and shared memory within the SM's limits;
* the backend's "why not" on CPU; the statistic planes of csrc/fastpref_params.h against the contract;
* the op schemas of csrc/fastpref_api.cpp under ``opcheck`` with a Python model of the four epilogue
  kernels as their CPU kernel;
* the tiling of cuda_ops.py (the contract's four functions) against the fp64 oracle with that model
  standing in for the kernels: every output (logp, entropy, log_sum_sq_probs, mean_logits, is_top1
  incl. ties, the divergences and the student entropy, all gradients), split rows and vocabulary,
  vocabulary slices merged as the vocabulary-parallel layer merges them (sharded JSD included),
  per-head transforms, the logits cache and the recompute path; and the registered ops and the
  public API with ``backend="cuda"`` on CPU tensors (the model in place of the extension).

Runs on a GPU only (``-m gpu``): the real kernels against the model on odd shapes, strides and
alignments; ``opcheck`` of the real epilogue ops and of ``torch.ops.fastpref.*`` with the backend
choice ``"cuda"``; the contract and the public API against the oracle (the accuracy rule of
docs/design.md §6); ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_accurate as _accuracy_rule
from conftest import make_head, make_labels, settings

import fastpref as fp
from fastpref import backends
from fastpref import reference as ref
from fastpref.backends import contract as C
from fastpref.backends import cuda_build, cuda_ops, tiling

CSRC = cuda_build.csrc_dir()
KINDS = {"forward_kl": C.Kind.FORWARD_KL, "reverse_kl": C.Kind.REVERSE_KL, "jsd": C.Kind.JSD}
HAS_GPU = torch.version.cuda is not None and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA build of torch and a CUDA GPU")
EXTRAS = C.EXTRA_OUTPUTS  # entropy, log_sum_sq_probs, mean_logits, is_top1


# The accuracy rule (docs/design.md §6, tests/conftest.py) with one ulp of a bf16/fp16 *output*'s own dtype
# on the floor: the backend rounds its 16-bit gradients once from fp32, and a correctly rounded result may
# sit a full ulp from the truth where naive PyTorch was lucky.
assert_accurate = functools.partial(_accuracy_rule, out_ulps=1)


# =========================================================================== compile-only (no GPU)


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def device_build(request, tmp_path_factory):
    """csrc/epilogue.cu compiled once per architecture with the build's flags and ``-Xptxas -v``."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    arch = request.param
    cmd = cuda_build.nvcc_command(arch, tmp_path_factory.mktemp("nvcc") / f"epilogue_{arch}.o", ptxas_verbose=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return SimpleNamespace(arch=arch, cmd=cmd, proc=proc, seconds=time.perf_counter() - t0)


def test_nvcc_compiles_epilogue(device_build):
    """The device code (no torch headers) compiles for the GPUs we ship to, warnings as errors."""
    b = device_build
    print(f"{' '.join(b.cmd)}\n-> rc={b.proc.returncode} in {b.seconds:.1f}s")
    assert b.proc.returncode == 0, f"nvcc failed:\n{b.proc.stderr}"
    assert "-use_fast_math" not in " ".join(b.cmd) and "--use_fast_math" not in " ".join(b.cmd)


EXPECTED_KERNELS = 3 + 5 + 3 + 5  # forward per tile dtype; backward per (tile, dz) dtype pair (csrc/epilogue.cu)


def test_ptxas_no_spills_and_within_sm_limits(device_build):
    """Every kernel: no spills, no stack frame, registers within the launch bounds' limit (65536 / 256
    threads), static shared memory within 48 KiB.  Prints the table benchmarks/ptxas_cuda.py records."""
    b = device_build
    assert b.proc.returncode == 0, b.proc.stderr
    rows = cuda_build.parse_ptxas(b.proc.stderr)
    print(f"\n{'kernel':<52} {'arch':<6} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>5}")
    for r in rows:
        print(f"{cuda_build.short_kernel_name(r.kernel):<52} {r.arch:<6} {r.registers:>4} "
              f"{r.spill_stores:>5}/{r.spill_loads:<5} {r.stack:>5} {r.smem:>5}")
    assert len(rows) == EXPECTED_KERNELS and {r.arch for r in rows} == {b.arch}, [r.kernel for r in rows]
    for r in rows:
        name = cuda_build.short_kernel_name(r.kernel)
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{name} spills on {r.arch}: {r}"
        assert r.stack == 0, f"{name} uses a stack frame on {r.arch}: {r}"
        assert 0 < r.registers <= 65536 // 256, f"{name}: {r.registers} registers on {r.arch}"
        assert r.smem <= 48 * 1024, f"{name}: {r.smem} bytes of shared memory on {r.arch}"


def test_parse_ptxas_reads_a_report():
    """The parser on a report in ptxas' format (so the test above cannot pass on an unparsed report)."""
    text = """ptxas info    : Compiling entry function '_ZN8fastpref8epilogue19logprobs_fwd_kernelIfLi4EEEvNS_17LogprobsFwdParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN8fastpref8epilogue19logprobs_fwd_kernelIfLi4EEEvNS_17LogprobsFwdParamsE
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 192 bytes smem, 456 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN8fastpref8epilogue20logprobs_grad_kernelIffLi4EEEvNS_18LogprobsGradParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN8fastpref8epilogue20logprobs_grad_kernelIffLi4EEEvNS_18LogprobsGradParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 33 registers, used 0 barriers, 480 bytes cmem[0]
"""
    rows = cuda_build.parse_ptxas(text)
    assert [(r.registers, r.spill_stores, r.spill_loads, r.stack, r.smem) for r in rows] == [(40, 12, 16, 8, 192),
                                                                                              (33, 0, 0, 0, 0)]
    if shutil.which("c++filt"):
        assert cuda_build.short_kernel_name(rows[0].kernel) == "logprobs_fwd_kernel<fp32, 4>"


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
    assert isinstance(reason, str) and "CUDA tensors" in reason, reason
    with pytest.raises(RuntimeError, match="cuda"):
        fp.linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), backend="cuda")


def test_cuda_backend_supports_the_whole_contract():
    """Nothing is routed away from the CUDA backend any more (float64 goes to torch in dispatch)."""
    lp = C.LogprobsOptions(entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True, vocab_start=5,
                           vocab_size=100)
    dv = C.DivergenceOptions(kind=C.Kind.JSD, entropy=True, student=C.Transform(1.0, 3.0, 2.0),
                             teacher=C.Transform(1.0, None, 0.5))
    for op, opts in (("logprobs", lp), ("divergence", dv)):
        for sharded in (False, True):
            assert cuda_ops.unsupported(op, opts, sharded) is None


def test_csrc_files_open_with_a_summary():
    for name in ("fastpref_params.h", "epilogue.cuh", "epilogue.cu", "fastpref_api.cpp"):
        head = (CSRC / name).read_text().splitlines()[:3]
        assert all(line.startswith("//") for line in head), f"{name} must open with what it fuses and why"
        if name != "fastpref_api.cpp":
            assert "torch" not in "".join(
                line for line in (CSRC / name).read_text().splitlines() if line.startswith("#include")
            ), f"{name} must not include torch headers"


def test_params_header_matches_the_contract():
    """The plane indices, kinds and kWant bits of csrc/fastpref_params.h are the contract's."""
    consts = {k: int(v) for k, v in re.findall(r"constexpr int(?:32_t)? (k\w+) = (\d+);",
                                               (CSRC / "fastpref_params.h").read_text())}
    expect = {"kLpMax": C.LP_MAX, "kLpSum": C.LP_SUM, "kLpTarget": C.LP_TARGET, "kLpEnt": C.LP_ENT,
              "kLpSq": C.LP_SQ, "kLpZsum": C.LP_ZSUM, "kLpBefore": C.LP_BEFORE, "kLpPlanes": C.LP_PLANES,
              "kDvSmax": C.DV_SMAX, "kDvSsum": C.DV_SSUM, "kDvTmax": C.DV_TMAX, "kDvTsum": C.DV_TSUM,
              "kDvCross": C.DV_CROSS, "kDvSent": C.DV_SENT, "kDvKlt": C.DV_KLT, "kDvKls": C.DV_KLS,
              "kDvPlanes": C.DV_PLANES, "kForwardKl": int(C.Kind.FORWARD_KL), "kReverseKl": int(C.Kind.REVERSE_KL),
              "kJsd": int(C.Kind.JSD)}
    assert {k: consts.get(k) for k in expect} == expect
    for flag, bit in (("entropy", "kWantEntropy"), ("log_sum_sq_probs", "kWantSumSq"), ("mean_logits", "kWantZsum"),
                      ("is_top1", "kWantBefore")):
        assert cuda_ops._want(C.LogprobsOptions(**{flag: True})) == consts[bit], flag


# =========================================================================== a Python model of the kernels
#
# Same contract as the fastpref_cuda ops (csrc/fastpref_api.cpp): same arguments, writes into the same
# (a!) tensors, fp32 math.  Written from the kernel specification (csrc/fastpref_params.h,
# csrc/epilogue.cuh) with torch ops: each forward computes its tile's partial planes and merges them
# into the running statistics the way the contract merges slices.


def _transform(u, bias, inv_temp, cap):
    v = u.float()
    if bias is not None:
        v = v + bias
    return cap * torch.tanh(v * (inv_temp / cap)) if cap is not None else v * inv_temp


def _chain(d, z, inv_temp, cap):
    if cap is not None:
        d = d * (1.0 - (z * (1.0 / cap)) ** 2)
    return d * inv_temp


def _local(labels, col0, cols):
    local = labels - col0
    inside = (local >= 0) & (local < cols)
    return local, inside, local.clamp(0, cols - 1)


def emu_logprobs_stats_fwd(logits, labels, bias, stats, col0, inv_temp, cap, want):
    z = _transform(logits, bias, inv_temp, cap)
    rows, cols = z.shape
    local, inside, safe = _local(labels, col0, cols)
    m = z.amax(1)
    d = z - m[:, None]
    e = d.exp()
    tile = C.empty_logprobs_stats(rows, z)
    tile[C.LP_MAX], tile[C.LP_SUM] = m, e.sum(1)
    tile[C.LP_TARGET] = torch.where(inside, z.gather(1, safe[:, None])[:, 0], torch.zeros_like(m))
    if want & 1:
        tile[C.LP_ENT] = (e * d).sum(1)
    if want & 2:
        tile[C.LP_SQ] = (e * e).sum(1)
    if want & 4:
        tile[C.LP_ZSUM] = z.sum(1)
    if want & 8:
        before = torch.arange(cols)[None, :] < local[:, None]
        tile[C.LP_BEFORE] = z.masked_fill(~before, float("-inf")).amax(1)
    merged = C.merge_logprobs(torch.stack([stats, tile]))
    for bit, plane in ((1, C.LP_ENT), (2, C.LP_SQ), (4, C.LP_ZSUM), (8, C.LP_BEFORE)):
        if not want & bit:  # planes not asked for keep their values
            merged[plane] = stats[plane]
    stats.copy_(merged)


def emu_logprobs_grad_tile(logits, dz_out, labels, bias, grad_logp, grad_entropy, lse, entropy, col0, inv_temp, cap):
    z = _transform(logits, bias, inv_temp, cap)
    cols = z.shape[1]
    g = grad_logp[:, None]
    p = torch.exp(z - lse[:, None])
    if grad_entropy is not None:
        d = -p * (g + grad_entropy[:, None] * (z - (lse - entropy)[:, None]))
        skip = (grad_logp == 0) & (grad_entropy == 0)
    else:
        d = -p * g
        skip = grad_logp == 0
    onehot = torch.arange(cols)[None, :] == (labels - col0)[:, None]
    d = d + torch.where(onehot, g, torch.zeros_like(d))
    d = _chain(d, z, inv_temp, cap)
    d = torch.where(skip[:, None], torch.zeros_like(d), d)
    (logits if dz_out is None else dz_out).copy_(d)


def emu_divergence_stats_fwd(s_logits, t_logits, s_bias, t_bias, stats, lse, kind, pass_, entropy, beta, s_inv_temp,
                             s_cap, t_inv_temp, t_cap):
    zs = _transform(s_logits, s_bias, s_inv_temp, s_cap)
    zt = _transform(t_logits, t_bias, t_inv_temp, t_cap)
    if pass_ == 1:
        log_ps, log_pt = zs - lse[:, :1], zt - lse[:, 1:]
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        stats[C.DV_KLT] += (log_pt.exp() * (log_pt - log_m)).sum(1)
        stats[C.DV_KLS] += (log_ps.exp() * (log_ps - log_m)).sum(1)
        return
    ms, mt = zs.amax(1), zt.amax(1)
    es, et = torch.exp(zs - ms[:, None]), torch.exp(zt - mt[:, None])
    tile = C.empty_divergence_stats(zs.shape[0], zs)
    tile[C.DV_SMAX], tile[C.DV_SSUM], tile[C.DV_TMAX], tile[C.DV_TSUM] = ms, es.sum(1), mt, et.sum(1)
    if kind == C.Kind.FORWARD_KL:
        tile[C.DV_CROSS] = (et * (zt - zs)).sum(1)
    elif kind == C.Kind.REVERSE_KL:
        tile[C.DV_CROSS] = (es * (zs - zt)).sum(1)
    if entropy:
        tile[C.DV_SENT] = (es * (zs - ms[:, None])).sum(1)
    merged = C.merge_divergence(torch.stack([stats, tile]), C.Kind(kind))
    if not entropy:  # planes not asked for keep their values
        merged[C.DV_SENT] = stats[C.DV_SENT]
    if kind == C.Kind.JSD:  # (a JSD has no cross term)
        merged[C.DV_CROSS] = stats[C.DV_CROSS]
    stats.copy_(merged)


def emu_divergence_grad_tile(s_logits, dz_out, t_logits, s_bias, t_bias, grad, saved, kind, beta, s_inv_temp, s_cap,
                             t_inv_temp, t_cap):
    zs = _transform(s_logits, s_bias, s_inv_temp, s_cap)
    zt = _transform(t_logits, t_bias, t_inv_temp, t_cap)
    log_ps, log_pt = zs - saved[:, :1], zt - saved[:, 1:2]
    ps, g, aux = log_ps.exp(), grad[:, None], saved[:, 2:3]
    if kind == C.Kind.FORWARD_KL:
        d = g * (ps - log_pt.exp())
    elif kind == C.Kind.REVERSE_KL:
        d = g * ps * (log_ps - log_pt - aux)
    else:
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        d = g * (1 - beta) * ps * (log_ps - log_m - aux)
    d = _chain(d, zs, s_inv_temp, s_cap)
    d = torch.where((grad == 0)[:, None], torch.zeros_like(d), d)
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
    return cuda_ops.IMPL


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch, emulated_kernels):
    """Dispatch lets ``backend="cuda"`` run CPU tensors (the model in place of the extension), so the
    registered ops, the autograd Functions and the public API run cuda_ops' tiling."""
    monkeypatch.setattr(cuda_ops, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(backends, "_resolved", {})  # forget resolutions made with the patch (and before it)
    yield


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


def _op_samples(ops, device="cpu", gen=None, dtype=torch.float32, n=5, c=7, col0=3):
    """(op, args) pairs covering every optional plane, a first and a later tile, dz in place and apart,
    with and without bias / softcap, every kind and both divergence passes."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    logits = (rnd(n, c) * 3).to(dtype)
    t_logits = (rnd(n, c) * 3).to(dtype)
    labels = torch.randint(col0 - 2, col0 + c + 2, (n,), generator=gen).to(device)
    bias = rnd(c)
    running = C.empty_logprobs_stats(n, logits.float())
    running[C.LP_MAX], running[C.LP_SUM], running[C.LP_ENT] = rnd(n) + 1, rnd(n).abs() + 1, rnd(n)
    samples = []
    for want, stats in ((15, C.empty_logprobs_stats(n, logits.float())), (5, running), (0, running)):
        samples.append((ops.logprobs_stats_fwd, (logits, labels, bias if want else None, stats.clone(), col0, 0.7,
                                                 5.0 if want else None, want)))
    grad = rnd(n)
    grad[1] = 0.0  # an ignored row
    g_ent = rnd(n)
    g_ent[1] = 0.0
    lse = logits.float().logsumexp(1) + 0.5
    ent = rnd(n).abs() + 1
    for dz_out in (None, torch.empty_like(logits)):
        samples.append((ops.logprobs_grad_tile, (logits.clone(), dz_out, labels, bias, grad, g_ent, lse, ent, col0,
                                                 1.3, None)))
    samples.append((ops.logprobs_grad_tile, (logits.clone(), None, labels, None, grad, None, lse, None, col0, 1.0,
                                             3.0)))
    dstats = C.empty_divergence_stats(n, logits.float())
    lse2 = torch.stack([logits.float().logsumexp(1), t_logits.float().logsumexp(1)], 1) + 0.25
    saved = torch.cat([lse2, rnd(n, 1).abs()], 1)
    for kind in C.Kind:
        k = int(kind)
        samples.append((ops.divergence_stats_fwd, (logits, t_logits, bias, None, dstats.clone(), None, k, 0,
                                                   kind == C.Kind.FORWARD_KL, 0.3, 0.9, None, 1.1, 4.0)))
        if kind == C.Kind.JSD:
            samples.append((ops.divergence_stats_fwd, (logits, t_logits, bias, bias, dstats.clone(), lse2, k, 1,
                                                       False, 0.3, 0.9, 6.0, 0.8, None)))
        samples.append((ops.divergence_grad_tile, (logits.clone(), None, t_logits, bias, bias, grad, saved, k, 0.3,
                                                   1.1, 6.0, 0.9, None)))
    return samples


def test_op_schemas_pass_opcheck_with_the_python_model(gen):
    """The C++ schemas (parsed from fastpref_api.cpp) with cuda_build's fake kernels pass opcheck on CPU."""
    schemas = _schemas()
    assert set(schemas) == set(cuda_build.EPILOGUE_OPS), schemas
    ns = "fastpref_cuda_schema_check"
    lib = torch.library.Library(ns, "FRAGMENT")
    for name, schema in schemas.items():
        lib.define(schema)
        lib.impl(name, getattr(EMULATED, name), "CPU")
        torch.library.register_fake(f"{ns}::{name}", lib=lib)(cuda_build.fake_epilogue)
    ops = getattr(torch.ops, ns)
    for op, args in _op_samples(ops, gen=gen):
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


# =========================================================================== the contract on CPU (the model as kernels)


def _shard_bounds(vocab: int, shards: int):
    step = -(-vocab // shards)
    return [(v0, min(v0 + step, vocab)) for v0 in range(0, vocab, step)]


def _sl(t, v0, v1):
    return None if t is None else t[v0:v1]


def _top1_labels(h, w, b, tf: C.Transform, labels, gen, share=0.4):
    """``labels`` with a share of the counted rows pointing at the (first) argmax, so is_top1 is tested both ways."""
    z = ref.materialize_logits(h, w, b, temperature=tf.temperature, softcap=tf.softcap, logit_scale=tf.logit_scale)
    pick = (torch.rand(labels.shape, generator=gen) < share) & (labels != -100)
    return torch.where(pick, z.argmax(1), labels)


def _assert_top1(got, truth, z64, labels):
    """is_top1 equals the oracle's, except on rows whose label is within 1e-4 of another column's logit (a tie fp32
    logits cannot resolve), and the oracle has both True and False rows (so the check can fail)."""
    keep = labels != -100
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    zl = z64.gather(1, safe[:, None])[:, 0]
    others = z64.scatter(1, safe[:, None], float("-inf")).amax(1)
    near = keep & ((zl - others).abs() < 1e-4)
    assert got.dtype == torch.bool and got.shape == truth.shape
    assert torch.equal(got[~near], truth[~near]), f"is_top1 differs on rows {torch.nonzero((got != truth) & ~near)}"
    assert truth.any() and not truth.all()


def run_logprobs(impl, h, w, b, labels, opts, g_logp, g_ent, shards=1):
    """The contract's logprobs ops over ``shards`` vocabulary slices merged as the vocabulary-parallel layer
    merges them; -> (rows, (d_hidden, d_weight, d_bias), caches)."""
    vocab = w.shape[0]
    opts = replace(opts, vocab_size=vocab)
    parts, caches = [], []
    for v0, v1 in _shard_bounds(vocab, shards):
        o = replace(opts, vocab_start=v0)
        stats, cache = impl.logprobs_fwd(h, w[v0:v1], labels, _sl(b, v0, v1), o)
        assert stats.shape == (C.LP_PLANES, h.shape[0]) and stats.dtype == torch.float32
        assert cache.shape == impl.logprobs_cache_shape(h.shape[0], v1 - v0, h.dtype, o), "fake and real disagree"
        parts.append(stats)
        caches.append(cache)
    rows = C.finish_logprobs(C.merge_logprobs(torch.stack(parts)), labels, opts)
    g, ge = C.mask_logprobs_grads(g_logp.float(), g_ent.float() if opts.entropy else None, labels, opts)
    grads = []
    for (v0, v1), cache in zip(_shard_bounds(vocab, shards), caches):
        before = cache.clone()
        grads.append(impl.logprobs_bwd(g, ge, h, w[v0:v1], labels, _sl(b, v0, v1), rows.lse, rows.entropy, cache,
                                       replace(opts, vocab_start=v0), True, True, b is not None))
        assert torch.equal(cache, before), "the backward wrote into the forward's cache"
    d_h = sum(gr[0].float() for gr in grads).to(h.dtype)
    d_w = torch.cat([gr[1] for gr in grads])
    d_b = None if b is None else torch.cat([gr[2] for gr in grads])
    return rows, (d_h, d_w, d_b), caches


def _logprobs_oracle(h, w, b, labels, tf: C.Transform, g_logp, g_ent, precision):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (h, w, b)]
    out = ref.linear_logprobs(leaves[0], leaves[1], labels, leaves[2], temperature=tf.temperature, softcap=tf.softcap,
                              logit_scale=tf.logit_scale, outputs=EXTRAS, precision=precision)
    loss = (out["logp"].double() * g_logp).sum() + (out["entropy"].double() * g_ent).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return {k: v.detach() for k, v in out.items()}, grads


def check_logprobs(impl, case, gen, *, cache=True, shards=1, device="cpu"):
    _, n, d, v, dtype, ignored, has_bias, tf, ws = case
    h, w, b = make_head(n, d, v, dtype=dtype, bias=has_bias, gen=gen)
    labels = _top1_labels(h, w, b, tf, make_labels(n, v, ignored=ignored, gen=gen), gen)
    g_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    truth, truth_grads = _logprobs_oracle(h, w, b, labels, tf, g_logp, g_ent, "fp64")
    naive, naive_grads = _logprobs_oracle(h, w, b, labels, tf, g_logp, g_ent, "native")
    opts = C.LogprobsOptions(transform=tf, cache=cache, **{name: True for name in EXTRAS})
    mv = [None if t is None else t.to(device) for t in (h, w, b, labels, g_logp, g_ent)]
    with settings(workspace=ws):
        rows, grads, caches = run_logprobs(impl, *mv[:4], opts, *mv[4:], shards=shards)
    if cache and ws is None:
        assert all(c.numel() for c in caches), "the logits fit the budget: the forward must keep them"
    if not cache:
        assert not any(c.numel() for c in caches)
    keep = labels != -100
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        got = getattr(rows, name).cpu()
        assert got.dtype == torch.float32 and (got[~keep] == 0).all(), name
        assert_accurate(name, got, naive[name], truth[name], dtype)
    z64 = ref.materialize_logits(h, w, b, temperature=tf.temperature, softcap=tf.softcap, logit_scale=tf.logit_scale)
    _assert_top1(rows.is_top1.cpu(), truth["is_top1"], z64, labels)
    for name, got, nv, tr in zip(("d_hidden", "d_weight", "d_bias"), grads, naive_grads, truth_grads):
        assert got.dtype == dtype and got.shape == tr.shape, name
        assert_accurate(name, got.cpu(), nv, tr, dtype)


LOGPROB_CASES = [
    # id, N, D, V, dtype, ignored, bias, transform (temperature, softcap, logit_scale), workspace
    ("V123-fp32", 40, 24, 123, torch.float32, 0.0, False, C.Transform(), None),
    ("V123-fp32-ign-bias-T0.7-softcap5-scale1.3", 40, 24, 123, torch.float32, 0.2, True, C.Transform(0.7, 5.0, 1.3),
     None),
    ("V3001-fp32-split-rows-and-vocab-scale0.8", 48, 16, 3001, torch.float32, 0.2, True, C.Transform(1.0, None, 0.8),
     2**17),
    ("V3001-bf16-split-T1.3-softcap8", 48, 16, 3001, torch.bfloat16, 0.2, True, C.Transform(1.3, 8.0), 2**17),
    ("V123-fp16-bias", 33, 16, 123, torch.float16, 0.2, True, C.Transform(), None),
]


@pytest.mark.parametrize("cache", [True, False], ids=["keep-logits", "recompute"])
@pytest.mark.parametrize("case", LOGPROB_CASES, ids=[c[0] for c in LOGPROB_CASES])
def test_contract_logprobs_with_python_kernels(emulated_kernels, case, cache, gen):
    check_logprobs(emulated_kernels, case, gen, cache=cache)


@pytest.mark.parametrize("case", [LOGPROB_CASES[1], LOGPROB_CASES[3]], ids=[LOGPROB_CASES[1][0], LOGPROB_CASES[3][0]])
def test_contract_logprobs_vocabulary_slices(emulated_kernels, case, gen):
    """Three vocabulary slices (global labels, ``vocab_start``), merged: the same outputs and gradients."""
    check_logprobs(emulated_kernels, case, gen, cache=True, shards=3)


def test_contract_logprobs_native_16bit_tiles(emulated_kernels, monkeypatch, gen):
    """FASTPREF_CUDA_LOGITS=native: bf16 tiles, dz in place (the naive reference also rounds its logits to bf16)."""
    monkeypatch.setenv("FASTPREF_CUDA_LOGITS", "native")
    monkeypatch.setattr(cuda_ops, "_MM_OUT_DTYPE", [True])
    assert cuda_ops._tile_dtype(torch.bfloat16) == torch.bfloat16
    check_logprobs(emulated_kernels, ("native", 37, 16, 500, torch.bfloat16, 0.2, True, C.Transform(0.9, 6.0), 2**16),
                   gen, cache=False)


def test_contract_logprobs_planes_not_asked_for_stay_at_the_identity(emulated_kernels, monkeypatch, gen):
    """Over five vocabulary tiles, the optional planes nobody asked for stay at the merge identity."""
    monkeypatch.setattr(tiling, "_MIN_TILE_COLS", 64)
    h, w, _ = make_head(64, 8, 300, gen=gen)
    labels = make_labels(64, 300, gen=gen)
    with settings(workspace=2**16):
        assert tiling.plan_tiles(64, 300) == (64, 64)
        stats, cache = emulated_kernels.logprobs_fwd(h, w, labels, None, C.LogprobsOptions(vocab_size=300))
    empty = C.empty_logprobs_stats(64, stats)
    for plane in (C.LP_ENT, C.LP_SQ, C.LP_ZSUM, C.LP_BEFORE):
        assert torch.equal(stats[plane], empty[plane])
    assert cache.numel() == 0
    rows = C.finish_logprobs(stats, labels, C.LogprobsOptions(vocab_size=300))
    truth = ref.linear_logprobs(h, w, labels)
    assert_accurate("logp", rows.logp, ref.linear_logprobs(h, w, labels, precision="native"), truth, torch.float32)


@pytest.mark.parametrize("shards", [1, 3])
def test_contract_is_top1_with_exact_ties(emulated_kernels, monkeypatch, shards, gen):
    """Integer logits (exact in fp32) with many ties at the max, tiles of 64 columns and 64 rows: is_top1 is True only
    for the *first* argmax, across tile and slice boundaries."""
    monkeypatch.setattr(tiling, "_MIN_TILE_COLS", 64)
    n, d, v = 150, 6, 300
    h = torch.randint(-2, 3, (n, d), generator=gen).float()
    w = torch.randint(-2, 3, (v, d), generator=gen).float()
    z = h @ w.T
    is_max = z == z.amax(1, keepdim=True)
    first = is_max.float().argmax(1)
    last = v - 1 - is_max.flip(1).float().argmax(1)
    assert (first != last).sum() > n // 4, "the inputs must have ties"
    labels = torch.randint(0, v, (n,), generator=gen)
    which = torch.randint(0, 3, (n,), generator=gen)
    labels = torch.where(which == 0, first, torch.where(which == 1, last, labels))
    labels[::17] = -100
    opts = C.LogprobsOptions(is_top1=True, cache=False)
    zeros = torch.zeros(n, dtype=torch.float64)
    with settings(workspace=2**16):
        rows, _, _ = run_logprobs(emulated_kernels, h, w, None, labels, opts, zeros, zeros, shards=shards)
    truth = ref.linear_logprobs(h, w, labels, outputs=("is_top1",))["is_top1"]
    assert torch.equal(rows.is_top1, truth)
    assert truth[which == 0].all() or (labels[which == 0] == -100).any()
    assert not rows.is_top1[(which == 1) & (first != last)].any()


def test_contract_logprobs_frozen_head_and_no_rows(emulated_kernels, gen):
    h, w, b = make_head(9, 8, 50, bias=True, gen=gen)
    labels = make_labels(9, 50, gen=gen)
    opts = C.LogprobsOptions(vocab_size=50)
    stats, cache = emulated_kernels.logprobs_fwd(h, w, labels, b, opts)
    lse = C.finish_logprobs(stats, labels, opts).lse
    dh, dw, db = emulated_kernels.logprobs_bwd(torch.ones(9), None, h, w, labels, b, lse, None, cache, opts,
                                               True, False, False)
    assert dw is None and db is None and dh.shape == h.shape
    assert emulated_kernels.logprobs_bwd(torch.ones(9), None, h, w, labels, b, lse, None, cache, opts,
                                         False, False, False) == (None, None, None)
    h0, labels0 = h[:0], labels[:0]
    stats, cache = emulated_kernels.logprobs_fwd(h0, w, labels0, b, replace(opts, cache=True))
    assert stats.shape == (C.LP_PLANES, 0) and cache.numel() == 0
    dh, dw, db = emulated_kernels.logprobs_bwd(torch.ones(0), None, h0, w, labels0, b, torch.ones(0), None, cache,
                                               opts, True, True, True)
    assert dh.shape == (0, 8) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


DIVERGENCE_CASES = [
    # id, N, Ds, Dt, V, s dtype, t dtype, ignored, bias, student transform, teacher transform, workspace
    ("V123-fp32", 40, 24, 20, 123, torch.float32, torch.float32, 0.0, False, C.Transform(), C.Transform(), None),
    ("V123-fp32-ign-bias-per-head-transforms", 40, 24, 20, 123, torch.float32, torch.float32, 0.2, True,
     C.Transform(1.5, 6.0, 1.2), C.Transform(1.5, 4.0, 0.7), None),
    ("V3001-fp32-split", 48, 16, 12, 3001, torch.float32, torch.float32, 0.2, True, C.Transform(0.8),
     C.Transform(0.8, 5.0), 2**18),
    ("V3001-bf16-fp32teacher-split", 48, 16, 12, 3001, torch.bfloat16, torch.float32, 0.2, False,
     C.Transform(1.0, 8.0, 1.1), C.Transform(1.0, None, 0.9), 2**18),
]


def run_divergence(impl, hs, ws, bs, ht, wt, bt, labels, opts, grad, shards=1):
    """The contract's divergence ops over ``shards`` vocabulary slices, merged as the vocabulary-parallel layer
    merges them (a sharded JSD calls the forward a second time with the merged log-sum-exps)."""
    vocab = ws.shape[0]
    opts = replace(opts, vocab_size=vocab)
    bounds = _shard_bounds(vocab, shards)
    parts, caches = [], []
    for v0, v1 in bounds:
        o = replace(opts, vocab_start=v0)
        stats, cache = impl.divergence_fwd(hs, ws[v0:v1], _sl(bs, v0, v1), ht, wt[v0:v1], _sl(bt, v0, v1), None, o)
        assert stats.shape == (C.DV_PLANES, hs.shape[0]) and stats.dtype == torch.float32
        assert cache.shape == impl.divergence_cache_shape(hs.shape[0], v1 - v0, hs.dtype, o), "fake and real disagree"
        parts.append(stats)
        caches.append(cache)
    stats = C.merge_divergence(torch.stack(parts), opts.kind)
    if shards > 1 and opts.kind == C.Kind.JSD:
        lse_st = C.divergence_lse(stats)
        kl = []
        for v0, v1 in bounds:
            st, cache = impl.divergence_fwd(hs, ws[v0:v1], _sl(bs, v0, v1), ht, wt[v0:v1], _sl(bt, v0, v1), lse_st,
                                            replace(opts, vocab_start=v0))
            assert cache.numel() == 0
            kl.append(st[[C.DV_KLT, C.DV_KLS]])
        stats[[C.DV_KLT, C.DV_KLS]] = sum(kl)
    rows = C.finish_divergence(stats, labels, opts)
    g = C.mask_divergence_grad(grad.float(), labels, opts)
    grads = []
    for (v0, v1), cache in zip(bounds, caches):
        before = cache.clone()
        grads.append(impl.divergence_bwd(g, hs, ws[v0:v1], _sl(bs, v0, v1), ht, wt[v0:v1], _sl(bt, v0, v1),
                                         rows.saved, cache, replace(opts, vocab_start=v0), True, True, bs is not None))
        assert torch.equal(cache, before), "the backward wrote into the forward's cache"
    d_h = sum(gr[0].float() for gr in grads).to(hs.dtype)
    d_w = torch.cat([gr[1] for gr in grads])
    d_b = None if bs is None else torch.cat([gr[2] for gr in grads])
    return rows, (d_h, d_w, d_b), caches


def check_divergence(impl, case, kind, gen, *, cache=True, shards=1, device="cpu", beta=0.3):
    _, n, ds, dt, v, sdt, tdt, ignored, has_bias, stf, ttf, ws = case
    assert stf.temperature == ttf.temperature  # the public API (and the oracle) take one temperature
    hs, wsh, bs = make_head(n, ds, v, dtype=sdt, bias=has_bias, gen=gen)
    ht, wt, bt = make_head(n, dt, v, dtype=tdt, bias=has_bias, gen=gen)
    labels = make_labels(n, v, ignored=ignored, gen=gen)
    grad = torch.randn(n, generator=gen, dtype=torch.float64)

    def oracle(precision):
        leaves = [None if t is None else t.detach().requires_grad_() for t in (hs, wsh, bs)]
        div, ent = ref.linear_divergence(
            leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2], teacher_bias=bt, kind=kind, beta=beta,
            temperature=stf.temperature, student_softcap=stf.softcap, teacher_softcap=ttf.softcap,
            student_logit_scale=stf.logit_scale, teacher_logit_scale=ttf.logit_scale, return_entropy=True,
            precision=precision)
        grads = torch.autograd.grad((div.double() * grad).sum(), [t for t in leaves if t is not None])
        return div.detach(), ent.detach(), grads

    truth, truth_ent, truth_grads = oracle("fp64")
    naive, naive_ent, naive_grads = oracle("native")
    opts = C.DivergenceOptions(kind=KINDS[kind], beta=beta, student=stf, teacher=ttf, entropy=True, cache=cache)
    mv = [None if t is None else t.to(device) for t in (hs, wsh, bs, ht, wt, bt, labels, grad)]
    with settings(workspace=ws):
        rows, grads, caches = run_divergence(impl, *mv[:7], opts, mv[7], shards=shards)
    if cache and ws is None:
        assert all(c.numel() for c in caches), "both heads' logits fit the budget: the forward must keep them"
    assert rows.saved.shape == (n, 3) and rows.saved.dtype == torch.float32
    assert (rows.div.cpu()[labels == -100] == 0).all()
    assert_accurate(kind, rows.div.cpu(), naive, truth, sdt)
    assert_accurate("student entropy", rows.entropy.cpu(), naive_ent, truth_ent, sdt)
    for name, got, nv, tr in zip(("d_hidden", "d_weight", "d_bias"), grads, naive_grads, truth_grads):
        assert got.dtype == sdt and got.shape == tr.shape, name
        assert_accurate(f"{kind} {name}", got.cpu(), nv, tr, sdt)


@pytest.mark.parametrize("cache", [True, False], ids=["keep-logits", "recompute"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=[c[0] for c in DIVERGENCE_CASES])
def test_contract_divergence_with_python_kernels(emulated_kernels, case, kind, cache, gen):
    check_divergence(emulated_kernels, case, kind, gen, cache=cache)


@pytest.mark.parametrize("kind", list(KINDS))
def test_contract_divergence_vocabulary_slices(emulated_kernels, kind, gen):
    """Two vocabulary slices merged (JSD: a second call with the merged log-sum-exps)."""
    check_divergence(emulated_kernels, DIVERGENCE_CASES[1], kind, gen, cache=True, shards=2)


# =========================================================================== registered ops and public API on CPU


def test_registered_ops_with_backend_cuda_pass_opcheck(cuda_backend_on_cpu, gen):
    """``torch.ops.fastpref.*`` with the backend choice ``"cuda"``: the fake kernels (cache shapes from
    cuda_ops) agree with what cuda_ops returns, and the schemas hold."""
    n, v = 12, 70
    h, w, b = make_head(n, 8, v, bias=True, gen=gen)
    labels = make_labels(n, v, ignored=0.2, gen=gen)
    utils = ("test_schema", "test_faketensor")
    for cache in (True, False):
        opts = C.LogprobsOptions(transform=C.Transform(0.9, 5.0, 1.1), entropy=True, is_top1=True, mean_logits=True,
                                 log_sum_sq_probs=True, cache=cache, vocab_size=v)
        args = (h, w, labels, b, *C.logprobs_to_args(opts), "cuda")
        torch.library.opcheck(torch.ops.fastpref.logprobs_fwd.default, args, test_utils=utils)
        stats, kept = torch.ops.fastpref.logprobs_fwd(*args)
        assert (kept.numel() > 0) == cache
        rows = C.finish_logprobs(stats, labels, opts)
        g, ge = C.mask_logprobs_grads(torch.randn(n, generator=gen), torch.randn(n, generator=gen), labels, opts)
        torch.library.opcheck(torch.ops.fastpref.logprobs_bwd.default,
                              (g, ge, h, w, labels, b, rows.lse, rows.entropy, kept, *C.logprobs_to_args(opts),
                               "cuda", True, True, True), test_utils=utils)
    ht, wt, _ = make_head(n, 6, v, gen=gen)
    for kind in C.Kind:
        opts = C.DivergenceOptions(kind=kind, beta=0.4, student=C.Transform(1.2, 4.0), teacher=C.Transform(1.2),
                                   entropy=True, cache=True, vocab_size=v)
        args = (h, w, b, ht, wt, None, None, *C.divergence_to_args(opts), "cuda")
        torch.library.opcheck(torch.ops.fastpref.divergence_fwd.default, args, test_utils=utils)
        stats, kept = torch.ops.fastpref.divergence_fwd(*args)
        rows = C.finish_divergence(stats, labels, opts)
        grad = C.mask_divergence_grad(torch.randn(n, generator=gen), labels, opts)
        torch.library.opcheck(torch.ops.fastpref.divergence_bwd.default,
                              (grad, h, w, b, ht, wt, None, rows.saved, kept, *C.divergence_to_args(opts), "cuda",
                               True, True, True), test_utils=utils)


def test_public_api_with_backend_cuda_on_cpu(cuda_backend_on_cpu, gen):
    """``fp.linear_logprobs(..., outputs=...)`` and ``fp.linear_divergence(..., return_entropy=True)`` with
    ``backend="cuda"`` through dispatch, the registered ops and autograd (keep-logits path), against the oracle."""
    n, d, v = 30, 16, 257
    h, w, b = make_head(n, d, v, bias=True, gen=gen)
    labels = make_labels(n, v, ignored=0.2, gen=gen)
    labels = _top1_labels(h, w, b, C.Transform(0.8, 6.0, 1.2), labels, gen)
    kw = dict(temperature=0.8, softcap=6.0, logit_scale=1.2)
    g_logp, g_ent = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    leaves = [t.detach().requires_grad_() for t in (h, w, b)]
    out = fp.linear_logprobs(*leaves[:2], labels, leaves[2], outputs=EXTRAS, backend="cuda", **kw)
    ((out.logp.double() * g_logp).sum() + (out.entropy.double() * g_ent).sum()).backward()
    truth, truth_grads = _logprobs_oracle(h, w, b, labels, C.Transform(0.8, 6.0, 1.2), g_logp, g_ent, "fp64")
    naive, naive_grads = _logprobs_oracle(h, w, b, labels, C.Transform(0.8, 6.0, 1.2), g_logp, g_ent, "native")
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_accurate(name, getattr(out, name).detach(), naive[name], truth[name], torch.float32)
    assert torch.equal(out.is_top1, truth["is_top1"]) and out.is_top1.any()
    for name, leaf, nv, tr in zip(("d_hidden", "d_weight", "d_bias"), leaves, naive_grads, truth_grads):
        assert_accurate(name, leaf.grad, nv, tr, torch.float32)

    ht, wt, bt = make_head(n, 12, v, bias=True, gen=gen)
    for kind in KINDS:
        s_leaves = [t.detach().requires_grad_() for t in (h, w, b)]
        dkw = dict(kind=kind, beta=0.35, temperature=0.9, student_softcap=7.0, student_logit_scale=1.1,
                   teacher_logit_scale=0.8)
        div, ent = fp.linear_divergence(s_leaves[0], s_leaves[1], ht, wt, labels, student_bias=s_leaves[2],
                                        teacher_bias=bt, return_entropy=True, backend="cuda", **dkw)
        (div.double() * g_logp).sum().backward()

        def oracle(precision, dkw=dkw):
            lv = [t.detach().requires_grad_() for t in (h, w, b)]
            dv, en = ref.linear_divergence(lv[0], lv[1], ht, wt, labels, student_bias=lv[2], teacher_bias=bt,
                                           return_entropy=True, precision=precision, **dkw)
            return dv.detach(), en, torch.autograd.grad((dv.double() * g_logp).sum(), lv)

        t_div, t_ent, t_grads = oracle("fp64")
        n_div, n_ent, n_grads = oracle("native")
        assert_accurate(kind, div.detach(), n_div, t_div, torch.float32)
        assert_accurate(f"{kind} entropy", ent, n_ent, t_ent, torch.float32)
        for name, leaf, nv, tr in zip(("d_hidden", "d_weight", "d_bias"), s_leaves, n_grads, t_grads):
            assert_accurate(f"{kind} {name}", leaf.grad, nv, tr, torch.float32)


def test_dispatch_sends_sharded_calls_to_cuda(cuda_backend_on_cpu):
    """With the extension available, an explicit ``"cuda"`` takes sharded calls and every option."""
    opts = C.LogprobsOptions(is_top1=True, vocab_start=64, vocab_size=256)
    assert backends.resolve("cuda", torch.device("cpu"), torch.bfloat16, "logprobs", opts, sharded=True) == "cuda"
    assert backends.resolve("cuda", torch.device("cpu"), torch.float64, "logprobs", opts, sharded=True) == "torch"


def _small_case_module():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_small_case.py"
    spec = importlib.util.spec_from_file_location("cuda_small_case", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_small_case_script_runs_on_cpu_with_the_model(cuda_backend_on_cpu, monkeypatch, gen):
    """benchmarks/cuda_small_case.py (the compute-sanitizer run of gpu_check_cuda.sh) on CPU tensors with the model
    as kernels: its cases use the current API and pass, so the first GPU run tests the kernels, not the script."""
    mod = _small_case_module()
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "failures", [])
    with settings(workspace=2**16):
        mod.logprobs_case("[cpu]", 13, 16, 301, torch.bfloat16, gen)
        mod.sharded_logprobs_case("[cpu]", 11, 16, 301, torch.float32, gen)
        for kind in KINDS:
            mod.divergence_case("[cpu]", 9, 12, 8, 257, torch.float32, kind, gen)
            mod.sharded_divergence_case("[cpu]", 9, 8, 201, torch.float32, kind, gen)
    assert mod.failures == []


# =========================================================================== on a GPU

GPU_LOGPROB_CASES = LOGPROB_CASES + [
    ("V32001-bf16-ign20-bias", 63, 64, 32001, torch.bfloat16, 0.2, True, C.Transform(), None),
    ("V50257-fp16-softcap30-T0.9", 40, 64, 50257, torch.float16, 0.2, False, C.Transform(0.9, 30.0), None),
    ("V32001-fp32-split-softcap10", 70, 48, 32001, torch.float32, 0.2, True, C.Transform(1.0, 10.0, 1.5), 2**20),
]


@pytest.fixture
def gpu_tf32_off():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs stay fp32 (the oracle's naive path does the same)
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cache", [True, False], ids=["keep-logits", "recompute"])
@pytest.mark.parametrize("case", GPU_LOGPROB_CASES, ids=[c[0] for c in GPU_LOGPROB_CASES])
def test_gpu_contract_logprobs_matches_oracle(case, cache, gen, gpu_tf32_off):
    check_logprobs(cuda_ops.IMPL, case, gen, cache=cache, device="cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", [GPU_LOGPROB_CASES[1], GPU_LOGPROB_CASES[-2]],
                         ids=[GPU_LOGPROB_CASES[1][0], GPU_LOGPROB_CASES[-2][0]])
def test_gpu_contract_logprobs_vocabulary_slices(case, gen, gpu_tf32_off):
    check_logprobs(cuda_ops.IMPL, case, gen, cache=True, shards=3, device="cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cache", [True, False], ids=["keep-logits", "recompute"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=[c[0] for c in DIVERGENCE_CASES])
def test_gpu_contract_divergence_matches_oracle(case, kind, cache, gen, gpu_tf32_off):
    check_divergence(cuda_ops.IMPL, case, kind, gen, cache=cache, device="cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", list(KINDS))
def test_gpu_contract_divergence_vocabulary_slices(kind, gen, gpu_tf32_off):
    check_divergence(cuda_ops.IMPL, DIVERGENCE_CASES[1], kind, gen, cache=True, shards=2, device="cuda")


@pytest.mark.gpu
@needs_gpu
def test_gpu_public_api_through_autograd(gen, gpu_tf32_off):
    n, v = 33, 501
    h, w, b = make_head(n, 32, v, dtype=torch.bfloat16, bias=True, gen=gen)
    labels = make_labels(n, v, ignored=0.2, gen=gen)
    labels = _top1_labels(h, w, b, C.Transform(), labels, gen)
    leaves = [t.cuda().requires_grad_() for t in (h, w, b)]
    out = fp.linear_logprobs(leaves[0], leaves[1], labels.cuda(), leaves[2], outputs=EXTRAS, backend="cuda")
    (out.logp.sum() + 0.1 * out.entropy.sum()).backward()
    truth = ref.linear_logprobs(h, w, labels, b, outputs=EXTRAS)
    naive = ref.linear_logprobs(h, w, labels, b, outputs=EXTRAS, precision="native")
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_accurate(name, getattr(out, name).detach().cpu(), naive[name], truth[name], torch.bfloat16)
    assert torch.equal(out.is_top1.cpu(), truth["is_top1"])
    assert all(t.grad is not None for t in leaves) and torch.all(leaves[0].grad[labels.cuda() == -100] == 0)
    div, ent = fp.linear_divergence(leaves[0], leaves[1], leaves[0].detach() * 0.5, leaves[1].detach(), labels.cuda(),
                                    kind="jsd", beta=0.4, return_entropy=True, backend="cuda")
    assert torch.all(div[labels.cuda() == -100] == 0) and torch.isfinite(div).all() and torch.isfinite(ent).all()


@pytest.mark.gpu
@needs_gpu
def test_gpu_out_of_range_label_gives_nan_not_oob(gen):
    h, w, _ = make_head(6, 16, 77, gen=gen)
    labels = torch.tensor([0, 76, 77, -5, -100, 10**12])
    lp = fp.linear_logprobs(h.cuda(), w.cuda(), labels.cuda(), backend="cuda").cpu()
    torch.cuda.synchronize()
    assert torch.isfinite(lp[:2]).all() and torch.isnan(lp[2:4]).all() and lp[4] == 0 and torch.isnan(lp[5])


@pytest.mark.gpu
@needs_gpu
def test_gpu_registered_ops_opcheck(gen):
    """``torch.ops.fastpref.*`` with the backend choice ``"cuda"`` (every opcheck test, autograd registration too)."""
    n, v = 20, 300
    h, w, b = (t.cuda() for t in make_head(n, 16, v, dtype=torch.bfloat16, bias=True, gen=gen))
    labels = make_labels(n, v, ignored=0.2, gen=gen).cuda()
    for cache in (True, False):
        opts = C.LogprobsOptions(entropy=True, is_top1=True, mean_logits=True, log_sum_sq_probs=True, cache=cache,
                                 vocab_size=v)
        args = (h, w, labels, b, *C.logprobs_to_args(opts), "cuda")
        torch.library.opcheck(torch.ops.fastpref.logprobs_fwd.default, args)
        stats, kept = torch.ops.fastpref.logprobs_fwd(*args)
        rows = C.finish_logprobs(stats, labels, opts)
        g = torch.randn(n, device="cuda")
        torch.library.opcheck(torch.ops.fastpref.logprobs_bwd.default,
                              (g, g, h, w, labels, b, rows.lse, rows.entropy, kept, *C.logprobs_to_args(opts), "cuda",
                               True, True, True))
    opts = C.DivergenceOptions(kind=C.Kind.JSD, beta=0.5, entropy=True, cache=True, vocab_size=v)
    torch.library.opcheck(torch.ops.fastpref.divergence_fwd.default,
                          (h, w, b, h * 0.5, w, None, None, *C.divergence_to_args(opts), "cuda"))


@pytest.mark.gpu
@pytest.mark.compile
@needs_gpu
def test_gpu_compile_fullgraph_backend_cuda(gen):
    h, w, _ = (None if t is None else t.cuda() for t in make_head(24, 32, 500, dtype=torch.bfloat16, gen=gen))
    labels = make_labels(24, 500, ignored=0.2, gen=gen).cuda()
    cuda_ops._load_extension()  # the build happens eagerly, never while tracing

    def f(h, w):
        out = fp.linear_logprobs(h, w, labels, outputs=("entropy", "is_top1"), backend="cuda")
        return out.logp.sum() + out.entropy.sum(), out.is_top1

    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, top1 = torch.compile(f, fullgraph=True)(hl, wl)
    loss.backward()
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss_e, top1_e = f(he, we)
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e)
    assert torch.equal(top1, top1_e)
    torch.testing.assert_close(hl.grad, he.grad)
    torch.testing.assert_close(wl.grad, we.grad)


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
    _kernels_vs_model(cuda_build.load(), dtype, cols, pad, offset, gen, "cuda")


def test_kernel_comparison_harness_on_cpu(gen):
    """The harness of the test above, model against itself on CPU (catches harness bugs here)."""
    _kernels_vs_model(EMULATED, torch.bfloat16, 123, 3, 1, gen, "cpu")


def _kernels_vs_model(ops, dtype, cols, pad, offset, gen, device):
    n, col0 = 9, 5
    z = _strided_tile(n, cols, dtype, pad, offset, gen, device)
    zt = _strided_tile(n, cols, dtype, pad + 1, offset, gen, device)
    labels = torch.randint(col0 - 1, col0 + cols + 1, (n,), generator=gen)
    labels[1] = -100
    labels = labels.to(device)
    bias = torch.randn(cols, generator=gen).to(device)
    running = C.empty_logprobs_stats(n, torch.empty(0, device=device))
    running[C.LP_MAX] = torch.randn(n, generator=gen).to(device) + 8
    for plane in (C.LP_SUM, C.LP_SQ):
        running[plane] = torch.rand(n, generator=gen).to(device) + 0.5
    for plane in (C.LP_TARGET, C.LP_ENT, C.LP_ZSUM, C.LP_BEFORE):
        running[plane] = torch.randn(n, generator=gen).to(device)
    for stats0 in (C.empty_logprobs_stats(n, running), running):
        for want, cap in ((15, 7.0), (0, None), (9, None)):
            outs = []
            for impl in (ops, EMULATED):
                stats = stats0.clone()
                impl.logprobs_stats_fwd(z, labels, bias, stats[:, :], col0, 0.8, cap, want)
                outs.append(stats)
            torch.testing.assert_close(outs[0], outs[1], rtol=2e-5, atol=2e-5, equal_nan=True)
    lse = torch.randn(n, generator=gen).to(device) + 9
    saved = torch.cat([torch.randn(n, 2, generator=gen) + 9, torch.rand(n, 1, generator=gen)], 1).to(device)
    grad, g_ent = torch.randn(n, generator=gen).to(device), torch.randn(n, generator=gen).to(device)
    grad[1], g_ent[1] = 0.0, 0.0  # an ignored row
    dz_dtypes = [dtype] + ([torch.bfloat16, torch.float16] if dtype == torch.float32 else [])
    for dz_dtype in dz_dtypes:
        tol = dict(rtol=2e-5, atol=2e-6) if dz_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
        res = []
        for impl in (ops, EMULATED):
            zz = _same_layout(z) if dz_dtype == dtype else z
            dz = None if dz_dtype == dtype else torch.empty(n, cols, dtype=dz_dtype, device=device)
            impl.logprobs_grad_tile(zz, dz, labels, bias, grad, g_ent, lse, saved[:, 2] + 1, col0, 1.2, 5.0)
            res.append(zz if dz is None else dz)
        torch.testing.assert_close(res[0].float(), res[1].float(), **tol, equal_nan=True)
        for kind in (0, 1, 2):
            res = []
            for impl in (ops, EMULATED):
                zz = _same_layout(z) if dz_dtype == dtype else z
                dz = None if dz_dtype == dtype else torch.empty(n, cols, dtype=dz_dtype, device=device)
                impl.divergence_grad_tile(zz, dz, zt, bias, None, grad, saved, kind, 0.3, 0.9, None, 1.1, 6.0)
                res.append(zz if dz is None else dz)
            torch.testing.assert_close(res[0].float(), res[1].float(), **tol)
    dv0 = C.empty_divergence_stats(n, torch.empty(0, device=device))
    dv1 = dv0.clone()
    dv1[C.DV_SMAX], dv1[C.DV_TMAX] = torch.randn(n, generator=gen).to(device) + 8, torch.randn(n, generator=gen).to(device) + 8
    for plane in (C.DV_SSUM, C.DV_TSUM, C.DV_CROSS, C.DV_SENT, C.DV_KLT, C.DV_KLS):
        dv1[plane] = torch.rand(n, generator=gen).to(device) + 0.5
    lse2 = saved[:, :2].contiguous()
    for kind in (0, 1, 2):
        for pass_ in ((0, 1) if kind == 2 else (0,)):
            for st0 in (dv0, dv1):
                outs = []
                for impl in (ops, EMULATED):
                    st = st0.clone()
                    impl.divergence_stats_fwd(z, zt, bias, None, st, lse2 if pass_ else None, kind, pass_, True, 0.3,
                                              1.1, 4.0, 0.7, None)
                    outs.append(st)
                torch.testing.assert_close(outs[0], outs[1], rtol=3e-5, atol=3e-5)


@pytest.mark.gpu
@needs_gpu
def test_gpu_opcheck_epilogue_ops(gen):
    ops = cuda_build.load()
    for dtype in (torch.float32, torch.bfloat16):
        for op, args in _op_samples(ops, device="cuda", gen=gen, dtype=dtype):
            torch.library.opcheck(op.default, args)
