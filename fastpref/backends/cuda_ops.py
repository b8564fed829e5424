"""CUDA C++ backend: cuBLAS GEMMs for the logits tiles, fused CUDA epilogues (``csrc/``) for the rest.

Per bounded tile of ``R`` rows x ``C`` vocabulary columns (``C = V`` unless the workspace says
otherwise): ``torch.mm`` writes ``hidden_chunk @ W[c0:c1].T`` into a reused workspace (fp32
accumulate; an fp32 tile for bf16/fp16 inputs by default), then one ``fastpref_cuda::`` kernel
reads the tile once: bias, temperature, softcap, online log-sum-exp, target gather, entropy,
two-head KL/JSD statistics (forward), or ``dz`` written in place / in the GEMM dtype (backward),
after which cuBLAS does ``d hidden += dz @ W``, ``d W += dz.T @ hidden`` and ``d bias += dz.sum(0)``.

Memory: the workspace (``fastpref.get_workspace_bytes()``: logits tiles, a ``[C x D]`` fp32
``d W`` accumulator for bf16/fp16 heads) plus ``O(N)`` per-row floats; with a split vocabulary,
bf16/fp16 ``d hidden`` accumulates in fp32 (``N x D``, as in the torch backend).  Compute:
``2NDV`` forward (``4NDV`` for JSD with a split vocabulary), ``6NDV`` backward.

Structure mirrors ``torch_backend.py`` (its numerical spec).  fp64 inputs run the torch backend
(fp64 is for gradcheck, not speed).  ``FASTPREF_CUDA_LOGITS=native`` keeps bf16/fp16 tiles
(half the tile traffic, ``dz`` fully in place) at the cost of logits rounded to bf16/fp16.

The extension is built with ninja on first eager use (``torch.utils.cpp_extension.load``), never
at import and never while tracing: the contract ops below are opaque ``torch.library`` ops whose
fake kernels need no extension.  ``FASTPREF_BUILD_CUDA=1 pip install .`` builds it ahead of
time as ``fastpref._C``, which is preferred when present.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from .. import _config
from . import contract as C

FORWARD_KL, REVERSE_KL, JSD = int(C.Kind.FORWARD_KL), int(C.Kind.REVERSE_KL), int(C.Kind.JSD)

LOGPROBS_STATE_WIDTH = 4  # csrc/fastpref_params.h: kLogprobsStateWidth
DIVERGENCE_STATE_WIDTH = 8  # kDivergenceStateWidth
EPILOGUE_OPS = ("logprobs_stats_fwd", "logprobs_grad_tile", "divergence_stats_fwd", "divergence_grad_tile")
SOURCES = ("fastpref_api.cpp", "epilogue.cu")  # epilogue.cuh and fastpref_params.h are included

_MIN_ROWS = 16  # GEMM efficiency: a tile keeps at least this many rows when the budget allows
_MIN_COLS = 256

_lock = threading.Lock()
_ops: Any = None  # torch.ops.fastpref_cuda once loaded
_load_error: Optional[str] = None
_toolchain: Optional[list] = None  # [reason or None], computed once
_HAS_MM_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads() and "dtype_out" in torch.ops.aten.addmm.overloads()
# addmm(fp32 acc, bf16 a, bf16 b, out_dtype=fp32) exists from torch 2.8 but rejects mixed dtypes
# before 2.10 ("self and mat2 must have the same dtype"); tried once, then remembered.
_ADDMM_MIXED_OK: list = []
# No --use_fast_math: it turns tanhf (softcap) into tanh.approx.f32 (~2^-11 relative error).
CUDA_FLAGS = ["-O3", "-lineinfo", "-ftz=true", "-prec-div=false", "-fmad=true"]


# --------------------------------------------------------------------------- availability and build


def csrc_dir() -> Path:
    """The installed ``fastpref.csrc`` package directory (the sources ship as package data)."""
    spec = importlib.util.find_spec("fastpref.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fastpref.csrc is not installed (the CUDA sources ship in it)")
    return Path(list(spec.submodule_search_locations)[0])


def _aot_available() -> bool:
    try:
        return importlib.util.find_spec("fastpref._C") is not None
    except (ImportError, ValueError):
        return False


def _toolchain_reason() -> Optional[str]:
    """Why a JIT build cannot start (no ninja, no nvcc), or None; checked once, never builds."""
    global _toolchain
    if _toolchain is None:
        reason = None
        try:
            from torch.utils import cpp_extension

            if not cpp_extension.is_ninja_available():
                reason = "ninja is not installed (pip install ninja), so the CUDA extension cannot be built"
            elif cpp_extension.CUDA_HOME is None:
                reason = "no CUDA toolkit was found (set CUDA_HOME), so nvcc cannot build the CUDA extension"
            elif not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists() and shutil.which("nvcc") is None:
                reason = f"nvcc was not found under CUDA_HOME={cpp_extension.CUDA_HOME} nor on PATH"
            else:
                missing = [s for s in SOURCES if not (csrc_dir() / s).is_file()]
                if missing:
                    reason = f"the CUDA sources {missing} are missing from {csrc_dir()}"
        except Exception as exc:  # a broken toolchain probe is a reason, not a crash
            reason = f"the CUDA toolchain check failed ({type(exc).__name__}: {exc})"
        _toolchain = [reason]
    return _toolchain[0]


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when this backend can run on ``device`` (it may still have to build first), else why not."""
    if device.type != "cuda":
        return f"the CUDA backend runs on CUDA tensors only (got {device.type} tensors)"
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support (torch.version.cuda is None)"
    if _ops is not None:
        return None
    if _load_error is not None:
        return f"building/loading the CUDA extension failed earlier: {_load_error}"
    if _aot_available():
        return None
    return _toolchain_reason()


def _fake_epilogue(*args, **kwargs) -> None:
    """Fake (meta) kernel of every fastpref_cuda op: they only write into their (a!) arguments."""
    return None


def _register_fakes() -> None:
    # torch.library.register_fake needs the op to exist, and the schemas live in C++
    # (TORCH_LIBRARY in fastpref_api.cpp): so fakes are registered right after the load.
    for name in EPILOGUE_OPS:
        torch.library.register_fake(f"fastpref_cuda::{name}")(_fake_epilogue)


def load() -> Any:
    """Build (ninja, first call only) or import the extension; returns ``torch.ops.fastpref_cuda``.

    Call it eagerly (e.g. at start-up) to keep the one-time build (~1 min) out of the first step.
    """
    global _ops, _load_error
    if _ops is not None:
        return _ops
    if torch.compiler.is_compiling():
        raise RuntimeError("fastpref: the CUDA extension must be loaded eagerly, not while tracing")
    with _lock:
        if _ops is not None:
            return _ops
        if _load_error is not None:
            raise RuntimeError(f"fastpref: the CUDA extension is unavailable: {_load_error}")
        try:
            if _aot_available():
                importlib.import_module("fastpref._C")  # registers the fastpref_cuda ops
            else:
                reason = _toolchain_reason()
                if reason is not None:
                    raise RuntimeError(reason)
                from torch.utils.cpp_extension import load as jit_load

                src = csrc_dir()
                jit_load(
                    name="fastpref_cuda",
                    sources=[str(src / s) for s in SOURCES],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=CUDA_FLAGS,
                    extra_include_paths=[str(src)],
                    is_python_module=False,
                    verbose=os.environ.get("FASTPREF_VERBOSE_BUILD") == "1",
                )
            _register_fakes()
            ops = torch.ops.fastpref_cuda
            for name in EPILOGUE_OPS:
                getattr(ops, name)  # fails loudly if the library did not register them
        except Exception as exc:
            _load_error = f"{type(exc).__name__}: {exc}"
            raise RuntimeError(f"fastpref: building/loading the CUDA extension failed: {_load_error}") from exc
        _ops = ops
    return _ops


# Indirection so tests can swap in a Python model of the four epilogue ops.
_load_extension = load


# --------------------------------------------------------------------------- tiles and GEMMs


def _tile_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits tile dtype for inputs of ``dtype``: fp32, unless FASTPREF_CUDA_LOGITS=native."""
    if dtype == torch.float32 or (_HAS_MM_DTYPE and os.environ.get("FASTPREF_CUDA_LOGITS", "fp32") != "native"):
        return torch.float32
    return dtype


def _pair_tile_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    ta, tb = _tile_dtype(a), _tile_dtype(b)
    return ta if ta == tb else torch.float32


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` with fp32 accumulation, rounded once to ``out.dtype``; no extra tile."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif _HAS_MM_DTYPE and a.is_cuda and out.dtype == torch.float32:
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:  # CPU (tests) or an old torch: a temporary product, cast into the tile
        out.copy_(torch.mm(a, b))


def _addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in acc's dtype; fp32 ``acc`` with bf16/fp16 operands accumulates in cuBLAS."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif _HAS_MM_DTYPE and a.is_cuda and acc.dtype == torch.float32 and _ADDMM_MIXED_OK != [False]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            if not _ADDMM_MIXED_OK:
                _ADDMM_MIXED_OK.append(True)
        except RuntimeError as exc:
            if _ADDMM_MIXED_OK or "dtype" not in str(exc):
                raise  # it worked before (or failed for another reason, e.g. out of memory): a real error
            _ADDMM_MIXED_OK.append(False)
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    elif _HAS_MM_DTYPE and a.is_cuda and acc.dtype == torch.float32:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(a, b))


def _plan(n_rows: int, vocab: int, tile_bytes: int, acc_bytes_per_col: int) -> tuple[int, int]:
    """Tile shape (R, C) within the workspace budget.

    ``tile_bytes``: bytes per tile element over all tiles that live together; ``acc_bytes_per_col``:
    bytes of the fp32 ``d W`` accumulator per vocabulary column (0 if none).  C is the whole
    vocabulary when ``_MIN_ROWS`` rows fit, else a multiple of 128; R fills the rest.
    """
    budget = _config.get_workspace_bytes()
    cols = vocab
    if acc_bytes_per_col:
        cols = min(cols, max(_MIN_COLS, (budget // 2) // acc_bytes_per_col))
    tile_budget = max(budget - cols * acc_bytes_per_col, budget // 2)
    if cols * _MIN_ROWS * tile_bytes > tile_budget:
        cols = max(_MIN_COLS, tile_budget // (_MIN_ROWS * tile_bytes))
    if cols < vocab:
        cols = max(128, cols // 128 * 128)
    cols = min(cols, vocab)
    rows = max(1, min(max(n_rows, 1), tile_budget // (cols * tile_bytes)))
    return rows, cols


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _cap(softcap: Optional[float]) -> float:
    return 0.0 if softcap is None else float(softcap)


def _ranges(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(start + step, total)


# --------------------------------------------------------------------------- logprobs


def logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor],
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``logp (N,)``, ``entropy (N,)`` (empty unless ``with_entropy``), ``lse (N,)``; all fp32."""
    ops = _load_extension()
    n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
    tdt = _tile_dtype(hidden.dtype)
    rows, cols = _plan(n, vocab, tdt.itemsize, 0)
    split = cols < vocab
    f32 = dict(dtype=torch.float32, device=dev)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    state = torch.empty(n if split else 0, LOGPROBS_STATE_WIDTH, **f32)
    bias32 = _f32(bias)
    workspace = torch.empty(rows * cols, dtype=tdt, device=dev)
    for r0, r1 in _ranges(n, rows):
        h = hidden[r0:r1]
        for c0, c1 in _ranges(vocab, cols):
            tile = workspace[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            _mm_into(tile, h, weight[c0:c1].T)
            ops.logprobs_stats_fwd(
                tile, labels[r0:r1], None if bias32 is None else bias32[c0:c1],
                state[r0:r1] if split else state, logp[r0:r1], entropy[r0:r1] if with_entropy else entropy,
                lse[r0:r1], c0, vocab, ignore_index, float(temperature), _cap(softcap), c0 == 0, c1 == vocab,
            )
    return logp, entropy, lse


class _GradTargets:
    """Gradient buffers and fp32 accumulators of one backward (vocabulary-outer, rows-inner)."""

    def __init__(self, hidden, weight, bias, n_slices, need_hidden, need_weight, need_bias, cols):
        n, dim, dev = hidden.shape[0], hidden.shape[1], hidden.device
        self.low = weight.dtype != torch.float32
        self.d_hidden = self.dh_acc = self.d_weight = self.dw_acc = self.db_acc = None
        self.direct_dh = n_slices == 1  # each row chunk's d hidden is finished by one GEMM
        if need_hidden:
            if self.direct_dh:
                self.d_hidden = torch.empty_like(hidden)
            elif self.low:
                self.dh_acc = torch.zeros(n, dim, dtype=torch.float32, device=dev)
            else:
                self.d_hidden = self.dh_acc = torch.zeros_like(hidden)
        if need_weight:
            self.d_weight = torch.empty_like(weight)
            if self.low:
                self.dw_acc = torch.empty(cols, dim, dtype=torch.float32, device=dev)
        if need_bias:
            self.db_acc = torch.empty(weight.shape[0], dtype=torch.float32, device=dev)
        self.bias_dtype = None if bias is None else bias.dtype

    def begin_slice(self, c0: int, c1: int) -> None:
        if self.d_weight is not None:
            self.w_slice = self.dw_acc[: c1 - c0] if self.low else self.d_weight[c0:c1]
            self.w_slice.zero_()
        if self.db_acc is not None:
            self.db_acc[c0:c1].zero_()

    def add_tile(self, dz: torch.Tensor, h: torch.Tensor, w: torch.Tensor, r0: int, r1: int, c0: int, c1: int):
        if self.direct_dh and self.d_hidden is not None:
            torch.mm(dz, w, out=self.d_hidden[r0:r1])
        elif self.dh_acc is not None:
            _addmm_f32(self.dh_acc[r0:r1], dz, w)
        if self.d_weight is not None:
            _addmm_f32(self.w_slice, dz.T, h)
        if self.db_acc is not None:
            self.db_acc[c0:c1] += dz.sum(0, dtype=torch.float32)

    def end_slice(self, c0: int, c1: int) -> None:
        if self.d_weight is not None and self.low:
            self.d_weight[c0:c1].copy_(self.w_slice)

    def result(self, hidden_dtype: torch.dtype):
        d_hidden = self.d_hidden
        if d_hidden is None and self.dh_acc is not None:
            d_hidden = self.dh_acc.to(hidden_dtype)
        d_bias = None if self.db_acc is None else self.db_acc.to(self.bias_dtype)
        return d_hidden, self.d_weight, d_bias


def logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor],
    lse: torch.Tensor,
    entropy: Optional[torch.Tensor],
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``dz = g (onehot - p) - g_ent p (z - sum p z)`` per tile (CUDA), then three cuBLAS GEMMs."""
    need_bias = need_bias and bias is not None
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    ops = _load_extension()
    n, vocab, dim, dev = hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.device
    tdt, gdt = _tile_dtype(hidden.dtype), hidden.dtype  # logits tile, GEMM-ready dz
    separate_dz = tdt != gdt
    low = weight.dtype != torch.float32
    tile_bytes = tdt.itemsize + (gdt.itemsize if separate_dz else 0)
    rows, cols = _plan(n, vocab, tile_bytes, dim * 4 if (need_weight and low) else 0)
    n_slices = -(-vocab // cols)
    out = _GradTargets(hidden, weight, bias, n_slices, need_hidden, need_weight, need_bias, cols)
    with_entropy = grad_entropy is not None and entropy is not None
    g_logp = grad_logp.to(torch.float32).contiguous()
    g_ent = grad_entropy.to(torch.float32).contiguous() if with_entropy else None
    ent = entropy.to(torch.float32).contiguous() if with_entropy else None
    lse = lse.to(torch.float32).contiguous()
    bias32 = _f32(bias)
    workspace = torch.empty(rows * cols, dtype=tdt, device=dev)
    dz_space = torch.empty(rows * cols, dtype=gdt, device=dev) if separate_dz else None
    for c0, c1 in _ranges(vocab, cols):
        w = weight[c0:c1]
        out.begin_slice(c0, c1)
        for r0, r1 in _ranges(n, rows):
            h = hidden[r0:r1]
            size = (r1 - r0) * (c1 - c0)
            tile = workspace[:size].view(r1 - r0, c1 - c0)
            dz = dz_space[:size].view(r1 - r0, c1 - c0) if separate_dz else tile
            _mm_into(tile, h, w.T)
            ops.logprobs_grad_tile(
                tile, dz if separate_dz else None, labels[r0:r1], None if bias32 is None else bias32[c0:c1],
                g_logp[r0:r1], None if g_ent is None else g_ent[r0:r1], lse[r0:r1],
                None if ent is None else ent[r0:r1], c0, vocab, ignore_index, float(temperature), _cap(softcap),
            )
            out.add_tile(dz, h, w, r0, r1, c0, c1)
        out.end_slice(c0, c1)
    return out.result(hidden.dtype)


# --------------------------------------------------------------------------- divergence


def divergence_fwd(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    s_bias: Optional[torch.Tensor],
    t_bias: Optional[torch.Tensor],
    ignore_index: int,
    kind: int,
    beta: float,
    temperature: float,
    s_softcap: Optional[float],
    t_softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ``div (N,)`` and ``stats (N, 3)`` = (lse_student, lse_teacher, aux), as the torch backend.

    Forward/reverse KL: one pass per tile.  JSD: a second kernel pass over the same tiles (still
    in the workspace when the vocabulary fits one tile; recomputed when it is split).
    """
    ops = _load_extension()
    n, vocab, dev = s_hidden.shape[0], s_weight.shape[0], s_hidden.device
    tdt = _pair_tile_dtype(s_hidden.dtype, t_hidden.dtype)
    rows, cols = _plan(n, vocab, 2 * tdt.itemsize, 0)
    split = cols < vocab
    f32 = dict(dtype=torch.float32, device=dev)
    div, stats = torch.empty(n, **f32), torch.empty(n, 3, **f32)
    state = torch.empty(n if split else 0, DIVERGENCE_STATE_WIDTH, **f32)
    sb, tb = _f32(s_bias), _f32(t_bias)
    ws_s = torch.empty(rows * cols, dtype=tdt, device=dev)
    ws_t = torch.empty(rows * cols, dtype=tdt, device=dev)
    passes = 2 if kind == JSD else 1
    for r0, r1 in _ranges(n, rows):
        lab = None if labels is None else labels[r0:r1]
        for pass_ in range(passes):
            for c0, c1 in _ranges(vocab, cols):
                size = (r1 - r0) * (c1 - c0)
                zs, zt = ws_s[:size].view(r1 - r0, c1 - c0), ws_t[:size].view(r1 - r0, c1 - c0)
                if pass_ == 0 or split:  # JSD's second pass reuses a whole-vocabulary tile
                    _mm_into(zs, s_hidden[r0:r1], s_weight[c0:c1].T)
                    _mm_into(zt, t_hidden[r0:r1], t_weight[c0:c1].T)
                ops.divergence_stats_fwd(
                    zs, zt, lab, None if sb is None else sb[c0:c1], None if tb is None else tb[c0:c1],
                    state[r0:r1] if split else state, div[r0:r1], stats[r0:r1], ignore_index, kind,
                    float(beta), float(temperature), _cap(s_softcap), _cap(t_softcap), pass_, c0 == 0, c1 == vocab,
                )
    return div, stats


def divergence_bwd(
    grad: torch.Tensor,
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    s_bias: Optional[torch.Tensor],
    t_bias: Optional[torch.Tensor],
    stats: torch.Tensor,
    ignore_index: int,
    kind: int,
    beta: float,
    temperature: float,
    s_softcap: Optional[float],
    t_softcap: Optional[float],
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Student-side gradients: teacher tile recomputed, ``dz`` per kind (CUDA), three cuBLAS GEMMs."""
    need_bias = need_bias and s_bias is not None
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    ops = _load_extension()
    n, vocab, dim, dev = s_hidden.shape[0], s_weight.shape[0], s_hidden.shape[1], s_hidden.device
    tdt, gdt = _pair_tile_dtype(s_hidden.dtype, t_hidden.dtype), s_hidden.dtype
    separate_dz = tdt != gdt
    low = s_weight.dtype != torch.float32
    tile_bytes = 2 * tdt.itemsize + (gdt.itemsize if separate_dz else 0)
    rows, cols = _plan(n, vocab, tile_bytes, dim * 4 if (need_weight and low) else 0)
    n_slices = -(-vocab // cols)
    out = _GradTargets(s_hidden, s_weight, s_bias, n_slices, need_hidden, need_weight, need_bias, cols)
    g = grad.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    sb, tb = _f32(s_bias), _f32(t_bias)
    ws_s = torch.empty(rows * cols, dtype=tdt, device=dev)
    ws_t = torch.empty(rows * cols, dtype=tdt, device=dev)
    dz_space = torch.empty(rows * cols, dtype=gdt, device=dev) if separate_dz else None
    for c0, c1 in _ranges(vocab, cols):
        w = s_weight[c0:c1]
        out.begin_slice(c0, c1)
        for r0, r1 in _ranges(n, rows):
            h = s_hidden[r0:r1]
            size = (r1 - r0) * (c1 - c0)
            zs, zt = ws_s[:size].view(r1 - r0, c1 - c0), ws_t[:size].view(r1 - r0, c1 - c0)
            dz = dz_space[:size].view(r1 - r0, c1 - c0) if separate_dz else zs
            _mm_into(zs, h, w.T)
            _mm_into(zt, t_hidden[r0:r1], t_weight[c0:c1].T)
            ops.divergence_grad_tile(
                zs, dz if separate_dz else None, zt, None if labels is None else labels[r0:r1],
                None if sb is None else sb[c0:c1], None if tb is None else tb[c0:c1], g[r0:r1], stats[r0:r1],
                ignore_index, kind, float(beta), float(temperature), _cap(s_softcap), _cap(t_softcap),
            )
            out.add_tile(dz, h, w, r0, r1, c0, c1)
        out.end_slice(c0, c1)
    return out.result(s_hidden.dtype)


# --------------------------------------------------------------------------- the contract


def unsupported(op: str, opts, sharded: bool) -> Optional[str]:
    """What the CUDA epilogues cannot compute yet, or ``None``."""
    if sharded:
        return "the CUDA backend does not take a vocabulary shard yet"
    if op == "logprobs" and opts.any_extra:
        return "the CUDA epilogues do not compute log_sum_sq_probs / mean_logits / is_top1 yet"
    if op == "divergence":
        if opts.student.kernel_params()[0] != opts.teacher.kernel_params()[0]:
            return "the CUDA divergence epilogue takes one logit_scale / temperature for both heads"
        if opts.entropy:
            return "the CUDA divergence epilogue does not compute the student entropy yet"
    return None


def _legacy_scalars(t: C.Transform) -> tuple[float, Optional[float]]:
    """The epilogues' ``(temperature, softcap)`` for ``z = softcap tanh(u / (T softcap))``, which is the
    contract's transform with ``T = 1 / inv_temp`` and ``softcap = cap``."""
    inv_temp, cap = t.kernel_params()
    return 1.0 / inv_temp, cap


def _contract_logprobs_fwd(hidden, weight, labels, bias, opts):
    temp, cap = _legacy_scalars(opts.transform)
    logp, entropy, lse = logprobs_fwd(hidden, weight, labels, bias, opts.ignore_index, temp, cap, opts.entropy)
    stats = C.empty_logprobs_stats(hidden.shape[0], lse)
    stats[C.LP_MAX], stats[C.LP_SUM], stats[C.LP_TARGET] = lse, 1.0, logp + lse
    if opts.entropy:
        stats[C.LP_ENT] = -entropy  # log s - t / s with s = 1
    return stats, lse.new_empty(0)


def _contract_logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, opts, need_hidden,
                           need_weight, need_bias):
    temp, cap = _legacy_scalars(opts.transform)
    return logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, opts.ignore_index, temp, cap,
                        need_hidden, need_weight, need_bias)


def _contract_divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, opts):
    temp, s_cap = _legacy_scalars(opts.student)
    _, t_cap = _legacy_scalars(opts.teacher)
    div, saved = divergence_fwd(s_hidden, s_weight, t_hidden, t_weight, None, s_bias, t_bias, opts.ignore_index,
                                int(opts.kind), opts.beta, temp, s_cap, t_cap)
    lse_s, lse_t, aux = saved.unbind(1)
    stats = C.empty_divergence_stats(div.shape[0], div)
    stats[C.DV_SMAX], stats[C.DV_SSUM], stats[C.DV_TMAX], stats[C.DV_TSUM] = lse_s, 1.0, lse_t, 1.0
    if opts.kind == C.Kind.FORWARD_KL:
        stats[C.DV_CROSS] = div + lse_t - lse_s
    elif opts.kind == C.Kind.REVERSE_KL:
        stats[C.DV_CROSS] = div + lse_s - lse_t
    else:
        stats[C.DV_KLS], stats[C.DV_KLT] = aux, (div - (1.0 - opts.beta) * aux) / opts.beta
    return stats, div.new_empty(0)


def _contract_divergence_bwd(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache, opts,
                             need_hidden, need_weight, need_bias):
    temp, s_cap = _legacy_scalars(opts.student)
    _, t_cap = _legacy_scalars(opts.teacher)
    return divergence_bwd(grad, s_hidden, s_weight, t_hidden, t_weight, None, s_bias, t_bias, saved,
                          opts.ignore_index, int(opts.kind), opts.beta, temp, s_cap, t_cap, need_hidden, need_weight,
                          need_bias)


def _no_cache(n, vocab, dtype, opts) -> tuple[int, ...]:
    return (0,)


IMPL = SimpleNamespace(
    logprobs_fwd=_contract_logprobs_fwd, logprobs_bwd=_contract_logprobs_bwd,
    divergence_fwd=_contract_divergence_fwd, divergence_bwd=_contract_divergence_bwd,
    logprobs_cache_shape=_no_cache, divergence_cache_shape=_no_cache,
)
