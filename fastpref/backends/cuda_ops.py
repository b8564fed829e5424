"""CUDA C++ backend: cuBLAS GEMMs for the logits tiles, fused CUDA epilogues (``csrc/``) for the rest.

It implements the whole contract of :mod:`.contract` (every statistic plane, vocabulary slices,
sharded JSD, per-head transforms, the logits cache).  Per tile of ``R`` rows x ``C`` vocabulary
columns (:func:`.tiling.plan_tiles`): ``torch.mm`` writes the raw logits ``hidden[rows] @
W[cols].T`` into a reused workspace tile, then one ``fastpref_cuda::`` kernel reads the tile once:

* forward: bias and the transform, then the tile's partial row statistics (``LP_*`` / ``DV_*``
  planes over the global columns ``[opts.vocab_start + c0, ...)``, labels global), merged in place
  into the call's running statistics (so a row's tiles need no separate state);
* backward: ``dz`` from the masked upstream gradients and the merged ``lse`` (and entropy / the
  divergence's saved rows), written in place or into a GEMM-ready tile, after which
  :class:`.tiling.GradAccumulator` does ``d hidden (+)= dz @ W``, ``d W = dz.T @ hidden`` and
  ``d bias += dz.sum(0)``.

The budget rule (docs/design.md §4): when the whole raw logits of the call fit
(:func:`.tiling.plan_cache`) and a backward will run, the forward's GEMMs write straight into the
cache ``[heads, chunks, N, cols]`` (fp32) and the backward reads it instead of recomputing:
``6NDV`` instead of ``8NDV`` FLOPs.  The cache holds the *raw* GEMM output, so the epilogues apply
the transform the same way to cached and recomputed tiles; the backward never writes into it
(``dz`` goes to its own tile), so the saved cache stays intact for a second backward.

Memory: the workspace budget (tiles, plus a ``[C x D]`` fp32 ``d W`` accumulator for bf16/fp16
heads when a chunk takes several row tiles) plus ``O(N)`` per-row floats; with a split vocabulary,
bf16/fp16 ``d hidden`` accumulates in fp32.  Compute: ``2NDV`` forward (``4NDV`` for a JSD whose
tiles do not stay resident between its two passes), ``6NDV`` backward (``4NDV`` from the cache).

Tiles are fp32 by default (16-bit GEMMs write their fp32 accumulators); ``FASTPREF_CUDA_LOGITS=native``
keeps bf16/fp16 tiles (half the tile traffic, ``dz`` fully in place) at the cost of logits rounded
to bf16/fp16 (the cache is fp32 either way).  Building and loading the extension: :mod:`.cuda_build`.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Optional

import torch

from . import contract as C
from . import cuda_build
from .tiling import GradAccumulator, cache_shape, mm_f32, plan_tiles, ranges

log = logging.getLogger("fastpref")

# Indirection so tests can swap in a Python model of the four epilogue ops.
_load_extension = cuda_build.load
load = cuda_build.load  # build / load the extension eagerly (benchmarks/gpu_check.sh calls cuda_ops.load())

_MM_OUT_DTYPE = ["dtype_out" in torch.ops.aten.mm.overloads()]  # [usable], cleared after a failure


def unavailable_reason(device: torch.device) -> Optional[str]:
    return cuda_build.unavailable_reason(device)


def unsupported(op: str, opts, sharded: bool) -> Optional[str]:
    """The epilogues implement the whole contract (float64 is routed to the torch backend by dispatch)."""
    return None


# --------------------------------------------------------------------------- tiles and GEMMs


def _tile_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Dtype of the logits tiles for inputs of ``dtypes``: fp32, unless FASTPREF_CUDA_LOGITS=native
    (or ``mm(out_dtype=...)`` is missing) and all inputs share one 16-bit dtype."""
    first = dtypes[0]
    if first == torch.float32 or any(d != first for d in dtypes):
        return torch.float32
    if _MM_OUT_DTYPE[0] and os.environ.get("FASTPREF_CUDA_LOGITS", "fp32") != "native":
        return torch.float32
    return first


def gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` with fp32 accumulation, written straight into the tile ``out``.

    CUDA-specific, hence not :func:`.tiling.mm_out` (which forms an fp32 product of 16-bit operands
    in a temporary, then copies it): the epilogues read the raw GEMM output from a reused fp32
    workspace tile or from the logits cache, so cuBLAS writes its fp32 accumulators there directly
    (``mm(out_dtype=float32, out=tile)``): no extra ``[rows x cols]`` tile, no extra pass over it.
    """
    if a.dtype == b.dtype == out.dtype:
        torch.mm(a, b, out=out)
        return
    if out.is_cuda and out.dtype == torch.float32 and a.dtype == b.dtype and _MM_OUT_DTYPE[0]:
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            _MM_OUT_DTYPE[0] = False
            log.warning("fastpref: torch.mm(out_dtype=float32, out=...) unavailable (%s); using a temporary", exc)
    out.copy_(mm_f32(a, b))  # CPU (tests of this module), or a torch without mm(out_dtype=...)


def _tile(space: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return space[: rows * cols].view(rows, cols)


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _cols(t: Optional[torch.Tensor], c0: int, c1: int) -> Optional[torch.Tensor]:
    return None if t is None else t[c0:c1]


# --------------------------------------------------------------------------- logprobs


def _want(opts: C.LogprobsOptions) -> int:
    """The forward's optional planes as the kernel's kWant* bits (csrc/fastpref_params.h)."""
    return (opts.entropy * 1) | (opts.log_sum_sq_probs * 2) | (opts.mean_logits * 4) | (opts.is_top1 * 8)


def logprobs_cache_shape(n: int, vocab: int, dtype: torch.dtype, opts: C.LogprobsOptions) -> tuple[int, ...]:
    """Shape of the fp32 raw-logits cache the forward keeps (``(0,)``: none)."""
    return cache_shape(n, vocab, elem_bytes=4) if opts.cache else (0,)


def logprobs_fwd(hidden, weight, labels, bias, opts: C.LogprobsOptions):
    """-> ``(stats [LP_PLANES, N] fp32, cache)`` over the vocabulary slice ``weight`` holds."""
    n, vocab = hidden.shape[0], weight.shape[0]
    stats = C.empty_logprobs_stats(n, hidden.new_empty(0, dtype=torch.float32))
    cache = hidden.new_empty(logprobs_cache_shape(n, vocab, hidden.dtype, opts), dtype=torch.float32)
    if n == 0 or vocab == 0:
        return stats, cache
    ops = _load_extension()
    cached = cache.numel() > 0
    tdt = torch.float32 if cached else _tile_dtype(hidden.dtype)
    rows, cols = (n, cache.shape[3]) if cached else plan_tiles(n, vocab, elem_bytes=tdt.itemsize)
    space = None if cached else hidden.new_empty(rows * cols, dtype=tdt)
    inv_temp, cap = opts.transform.kernel_params()
    bias32, want = _f32(bias), _want(opts)
    for r0, r1 in ranges(n, rows):
        for k, (c0, c1) in enumerate(ranges(vocab, cols)):
            tile = cache[0, k, :, : c1 - c0] if cached else _tile(space, r1 - r0, c1 - c0)
            gemm_into(tile, hidden[r0:r1], weight[c0:c1].T)
            ops.logprobs_stats_fwd(tile, labels[r0:r1], _cols(bias32, c0, c1), stats[:, r0:r1],
                                   opts.vocab_start + c0, inv_temp, cap, want)
    return stats, cache


def logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, opts: C.LogprobsOptions,
                 need_hidden: bool, need_weight: bool, need_bias: bool):
    """``dz = g (onehot - p) - g_ent p (log p + H)`` per tile (CUDA), chained through the transform, then
    the GEMMs of :class:`.tiling.GradAccumulator`.  ``g_logp`` / ``g_entropy`` arrive masked."""
    n, dim, vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
    need_bias = need_bias and bias is not None
    cached = cache.numel() > 0
    tdt = torch.float32 if cached else _tile_dtype(hidden.dtype)
    gdt = hidden.dtype  # dz goes to the GEMMs in the inputs' dtype
    separate = cached or tdt != gdt  # dz has its own tile (never written into the cache)
    if cached:
        rows, cols = n, cache.shape[3]
    else:
        rows, cols = plan_tiles(n, vocab, elem_bytes=tdt.itemsize + (gdt.itemsize if separate else 0),
                                acc_dim=dim if (need_weight and weight.dtype != torch.float32) else 0)
    acc = GradAccumulator(hidden, weight, bias, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias, chunks=-(-vocab // cols), rows=rows, cols=cols)
    if not acc.any or n == 0 or vocab == 0:  # (no rows: the accumulator's gradients are zeros)
        return acc.result(bias)
    ops = _load_extension()
    inv_temp, cap = opts.transform.kernel_params()
    g = g_logp.to(torch.float32).contiguous()
    with_entropy = g_entropy is not None and entropy is not None
    ge = g_entropy.to(torch.float32).contiguous() if with_entropy else None
    ent = entropy.to(torch.float32).contiguous() if with_entropy else None
    lse = lse.to(torch.float32).contiguous()
    bias32 = _f32(bias)
    space = None if cached else hidden.new_empty(rows * cols, dtype=tdt)
    dz_space = hidden.new_empty(rows * cols, dtype=gdt) if separate else None
    for k, (c0, c1) in enumerate(ranges(vocab, cols)):
        w = weight[c0:c1]
        acc.begin_chunk(c0, c1)
        for r0, r1 in ranges(n, rows):
            h = hidden[r0:r1]
            if cached:
                tile = cache[0, k, :, : c1 - c0]
            else:
                tile = _tile(space, r1 - r0, c1 - c0)
                gemm_into(tile, h, w.T)
            dz = _tile(dz_space, r1 - r0, c1 - c0) if separate else tile
            ops.logprobs_grad_tile(
                tile, dz if separate else None, labels[r0:r1], _cols(bias32, c0, c1), g[r0:r1],
                None if ge is None else ge[r0:r1], lse[r0:r1], None if ent is None else ent[r0:r1],
                opts.vocab_start + c0, inv_temp, cap,
            )
            acc.add(dz, h, w, r0, r1, c0, c1)
        acc.end_chunk(c0, c1)
    return acc.result(bias)


# --------------------------------------------------------------------------- divergence


def divergence_cache_shape(n: int, vocab: int, dtype: torch.dtype, opts: C.DivergenceOptions) -> tuple[int, ...]:
    """Shape of the fp32 raw-logits cache of both heads (``(0,)``: none)."""
    return cache_shape(n, vocab, elem_bytes=4, heads=2) if opts.cache else (0,)


class _Pair:
    """Both heads' GEMMs into a pair of tiles: the cache's (filled once) or the workspace's."""

    def __init__(self, s_hidden, s_weight, t_hidden, t_weight, cache, rows, cols, tdt):
        self.s_hidden, self.s_weight, self.t_hidden, self.t_weight = s_hidden, s_weight, t_hidden, t_weight
        self.cache = cache if cache.numel() else None
        if self.cache is None:
            self.space = [s_hidden.new_empty(rows * cols, dtype=tdt) for _ in range(2)]

    def tiles(self, k, r0, r1, c0, c1, compute: bool):
        """``(zs, zt)`` raw logits of rows ``r0:r1``, columns ``c0:c1`` (chunk ``k``); ``compute``: run
        the GEMMs (else the tiles already hold them)."""
        if self.cache is not None:
            zs, zt = self.cache[0, k, :, : c1 - c0], self.cache[1, k, :, : c1 - c0]
        else:
            zs, zt = (_tile(s, r1 - r0, c1 - c0) for s in self.space)
        if compute:
            gemm_into(zs, self.s_hidden[r0:r1], self.s_weight[c0:c1].T)
            gemm_into(zt, self.t_hidden[r0:r1], self.t_weight[c0:c1].T)
        return zs, zt


def divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, opts: C.DivergenceOptions):
    """-> ``(stats [DV_PLANES, N] fp32, cache)``.

    Without ``lse_st``: pass 0 folds every tile into the online planes (both heads' max / sum, the
    KL cross term, the student entropy); a JSD over the whole vocabulary then takes pass 1 for its
    two KL planes against the merged log-sum-exps (tiles re-read from the cache, or still resident
    when the vocabulary is one tile, else recomputed).  With ``lse_st`` (a sharded JSD, merged
    across shards): pass 1 only.
    """
    n, vocab = s_hidden.shape[0], s_weight.shape[0]
    stats = C.empty_divergence_stats(n, s_hidden.new_empty(0, dtype=torch.float32))
    keep = opts.cache and lse_st is None
    cache = s_hidden.new_empty(divergence_cache_shape(n, vocab, s_hidden.dtype, opts) if keep else (0,),
                               dtype=torch.float32)
    if n == 0 or vocab == 0:
        return stats, cache
    ops = _load_extension()
    online = lse_st is None
    kl_pass = opts.kind == C.Kind.JSD and (not online or C.covers_vocabulary(opts, vocab))
    cached = cache.numel() > 0
    tdt = torch.float32 if cached else _tile_dtype(s_hidden.dtype, t_hidden.dtype)
    rows, cols = (n, cache.shape[3]) if cached else plan_tiles(n, vocab, elem_bytes=tdt.itemsize, heads=2)
    resident = cached or (online and cols >= vocab)  # pass 1 finds the tiles pass 0 left
    pair = _Pair(s_hidden, s_weight, t_hidden, t_weight, cache, rows, cols, tdt)
    s_inv, s_cap = opts.student.kernel_params()
    t_inv, t_cap = opts.teacher.kernel_params()
    sb, tb = _f32(s_bias), _f32(t_bias)
    kind, beta = int(opts.kind), float(opts.beta)
    given = None if online else lse_st.to(torch.float32).contiguous()
    for r0, r1 in ranges(n, rows):
        st = stats[:, r0:r1]
        if online:
            for k, (c0, c1) in enumerate(ranges(vocab, cols)):
                zs, zt = pair.tiles(k, r0, r1, c0, c1, compute=True)
                ops.divergence_stats_fwd(zs, zt, _cols(sb, c0, c1), _cols(tb, c0, c1), st, None, kind, 0,
                                         opts.entropy, beta, s_inv, s_cap, t_inv, t_cap)
        if kl_pass:
            lse = C.divergence_lse(st).contiguous() if online else given[r0:r1]
            for k, (c0, c1) in enumerate(ranges(vocab, cols)):
                zs, zt = pair.tiles(k, r0, r1, c0, c1, compute=not resident)
                ops.divergence_stats_fwd(zs, zt, _cols(sb, c0, c1), _cols(tb, c0, c1), st, lse, kind, 1,
                                         opts.entropy, beta, s_inv, s_cap, t_inv, t_cap)
    return stats, cache


def divergence_bwd(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache,
                   opts: C.DivergenceOptions, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Student-side gradients: both tiles (cached or recomputed), ``dz`` per kind (CUDA), the GEMMs of
    :class:`.tiling.GradAccumulator`.  ``grad`` arrives masked; ``saved`` is ``(lse_s, lse_t, aux)``."""
    n, dim, vocab = s_hidden.shape[0], s_hidden.shape[1], s_weight.shape[0]
    need_bias = need_bias and s_bias is not None
    cached = cache.numel() > 0
    tdt = torch.float32 if cached else _tile_dtype(s_hidden.dtype, t_hidden.dtype)
    gdt = s_hidden.dtype
    separate = cached or tdt != gdt
    if cached:
        rows, cols = n, cache.shape[3]
    else:
        rows, cols = plan_tiles(n, vocab, elem_bytes=2 * tdt.itemsize + (gdt.itemsize if separate else 0),
                                acc_dim=dim if (need_weight and s_weight.dtype != torch.float32) else 0)
    acc = GradAccumulator(s_hidden, s_weight, s_bias, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias, chunks=-(-vocab // cols), rows=rows, cols=cols)
    if not acc.any or n == 0 or vocab == 0:  # (no rows: the accumulator's gradients are zeros)
        return acc.result(s_bias)
    ops = _load_extension()
    pair = _Pair(s_hidden, s_weight, t_hidden, t_weight, cache, rows, cols, tdt)
    s_inv, s_cap = opts.student.kernel_params()
    t_inv, t_cap = opts.teacher.kernel_params()
    sb, tb = _f32(s_bias), _f32(t_bias)
    g = grad.to(torch.float32).contiguous()
    saved = saved.to(torch.float32).contiguous()
    dz_space = s_hidden.new_empty(rows * cols, dtype=gdt) if separate else None
    for k, (c0, c1) in enumerate(ranges(vocab, cols)):
        w = s_weight[c0:c1]
        acc.begin_chunk(c0, c1)
        for r0, r1 in ranges(n, rows):
            zs, zt = pair.tiles(k, r0, r1, c0, c1, compute=not cached)
            dz = _tile(dz_space, r1 - r0, c1 - c0) if separate else zs
            ops.divergence_grad_tile(zs, dz if separate else None, zt, _cols(sb, c0, c1), _cols(tb, c0, c1),
                                     g[r0:r1], saved[r0:r1], int(opts.kind), float(opts.beta), s_inv, s_cap, t_inv,
                                     t_cap)
            acc.add(dz, s_hidden[r0:r1], w, r0, r1, c0, c1)
        acc.end_chunk(c0, c1)
    return acc.result(s_bias)


IMPL = SimpleNamespace(
    logprobs_fwd=logprobs_fwd, logprobs_bwd=logprobs_bwd, divergence_fwd=divergence_fwd,
    divergence_bwd=divergence_bwd, logprobs_cache_shape=logprobs_cache_shape,
    divergence_cache_shape=divergence_cache_shape,
)
