"""Fused ``linear_logprobs`` (docs/design.md §2.2): per-row statistics of the label's log-prob under an
LM head — and on request the entropy, ``log sum p^2``, the mean logit and whether the label is the
first argmax — without the ``[N x V]`` logits.

Math, per row, over the vocabulary slice ``weight`` holds (rows ``[vocab_start, vocab_start + V)``;
labels are shifted by ``vocab_start`` before the launch), with the contract's transform
``z = cap * tanh(u * inv_temp / cap)`` (``u * inv_temp`` without a softcap), ``u = h @ W.T + b``
(docs/design.md §2.1: ``inv_temp = logit_scale / temperature``, ``cap = softcap / temperature``),
the partial statistics of docs/design.md §3.2 relative to the running max ``m``:
    LP_MAX     m = max z                      LP_SUM     s = sum e^{z-m}
    LP_TARGET  z[label] (0 if not here)       LP_ENT     t = sum e^{z-m} (z-m)       (WITH_ENTROPY)
    LP_SQ      q = sum e^{2(z-m)}  (WITH_SQ)  LP_ZSUM    sum z                       (WITH_ZSUM)
    LP_BEFORE  max of z[v] over v < label, -inf if none                              (WITH_BEFORE)
When the max moves from m to m' (alpha = e^{m-m'}): s -> alpha s, t -> alpha (t + (m - m') s),
q -> alpha^2 q, so the entropy ``log s - t/s`` never subtracts two large numbers.  Each optional
plane is a compile-time flag: off, it costs nothing (the plane holds its neutral value).
The launcher merges vocabulary splits and ``contract.finish_logprobs`` makes the outputs:
``lse = m + log s``, ``logp = z[label] - lse``, ``entropy = log s - t/s``, ``log sum p^2 = log q - 2 log s``,
``mean = sum z / V``, ``is_top1 = z[label] >= m and z[label] > LP_BEFORE``.

Gradient (``logp`` and ``entropy`` only; the other outputs have none), ``p = exp(z - lse)``:
    dz = g_logp (onehot(label) - p) - g_ent p (z - sum p z),  then * inv_temp (1 - (z / cap)^2)
    d hidden = dz @ W,  d W = dz.T @ hidden,  d b = sum_rows dz

Forward (``_logprobs_fwd_kernel``): grid (row tiles, vocabulary splits).  Each program walks its
vocabulary range in ``BLOCK_V`` tiles, builds each logits tile with a D-loop of ``tl.dot``
(``_tiles._logits_tile``) and folds it into the running statistics.  Splits (more programs when rows
are few) write partial statistics ``[SPLITS, LP_PLANES, N]``, merged by ``contract.merge_logprobs``.
With ``STORE_CACHE`` (the whole fp32 logits fit the cache share of the workspace budget and a backward
will run, docs/design.md §4) each tile is also stored into the cache ``[1, N, V]``.
    FLOPs 2NDV; HBM bytes ~ N*D*e (hidden) + ceil(N / BLOCK_N) * V*D*e (head, mostly L2 hits)
    + O(N) outputs (+ 4NV written with the cache).

Backward (docs/design.md §5 has the why): the fully fused alternative would read-modify-write
per-program ``d hidden [BLOCK_N x D]`` / ``d W [BLOCK_V x D]`` accumulators once per tile, which costs
more than the GEMMs at LLM sizes.  Instead:
  1. ``_logprobs_bwd_dz_kernel`` recomputes each logits tile from the saved ``lse`` — or reads it from
     the cache (``FROM_CACHE``: no GEMM, 6NDV FLOPs in all instead of 8NDV) — forms ``dz`` in fp32
     and stores it, rounded to the input dtype, into a bounded workspace ``[N x Vc]`` covering one
     vocabulary chunk; per-row-tile column sums of the fp32 ``dz`` give d bias without atomics.
  2. Two library GEMMs per chunk (``tiling.GradAccumulator``): ``d W[chunk] = dz.T @ hidden``
     (complete: the reduction over all rows happens inside one GEMM) and ``d hidden (+)= dz @ W[chunk]``
     (fp32 across chunks).
  Deterministic (no atomics); the extra HBM traffic is dz written once and read twice (``6 N V``
  bytes in bf16).  The workspace is bounded by ``fastpref.get_workspace_bytes()`` (the chunk width
  shrinks as N grows; beside a cache it takes the remaining quarter of the budget).

dtypes: fp32 statistics and outputs; 16-bit operands go to tensor cores with fp32 accumulation
(the interpreter casts them to fp32 first: its 16-bit ``tl.dot`` is wrong); fp32 operands follow
PyTorch's TF32 setting (``input_precision="tf32"`` when it is on, ``"ieee"`` otherwise).  float64
inputs never get here (dispatch sends them to the torch backend).  A label outside the slice never
indexes memory (it just never matches a column); ``finish_logprobs`` turns invalid labels into NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import contract as C
from ..backends.tiling import GradAccumulator
from ._tiles import (
    _cached_tile,
    _chain,
    _grouped_pid,
    _logits_tile,
    _store_tile,
    cache_planes,
    dz_chunk_columns,
    head_flags,
    num_vocab_splits,
    tile_config,
)

# The contract's statistic planes as compile-time constants of the kernels.
LP_MAX = tl.constexpr(C.LP_MAX)
LP_SUM = tl.constexpr(C.LP_SUM)
LP_TARGET = tl.constexpr(C.LP_TARGET)
LP_ENT = tl.constexpr(C.LP_ENT)
LP_SQ = tl.constexpr(C.LP_SQ)
LP_ZSUM = tl.constexpr(C.LP_ZSUM)
LP_BEFORE = tl.constexpr(C.LP_BEFORE)
LP_PLANES = tl.constexpr(C.LP_PLANES)

# --------------------------------------------------------------------------- kernels


@triton.jit
def _logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr,             # hidden [N, D], head [V, D], bias [V] (any pointer without one)
    labels_ptr,                      # [N] int64, relative to this slice's first column
    part_ptr,                        # [SPLITS, LP_PLANES, N] fp32 partial statistics (all planes written)
    cache_ptr,                       # [N, V] fp32 logits (written if STORE_CACHE)
    N, V, D, TILES_PER_SPLIT,
    inv_temp, cap,                   # z = cap * tanh(u * inv_temp / cap)  (u * inv_temp without a softcap)
    HEAD: tl.constexpr,              # (HAS_BIAS, HAS_SOFTCAP, DOT_F32, PRECISION), see _tiles.head_flags
    WITH_ENTROPY: tl.constexpr, WITH_SQ: tl.constexpr, WITH_ZSUM: tl.constexpr, WITH_BEFORE: tl.constexpr,
    STORE_CACHE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    v_start = pid_s * TILES_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(V, v_start + TILES_PER_SPLIT * BLOCK_V)
    head = (h_ptr, w_ptr, b_ptr, D, inv_temp, cap)

    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    q_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    zsum_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    before_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        z = _logits_tile(head, HEAD, rows, cols, row_mask, col_mask, BLOCK_D)
        if STORE_CACHE:
            _store_tile(cache_ptr, z, rows, cols, row_mask[:, None] & col_mask[None, :], V)
        valid = col_mask[None, :]  # columns past the range count for nothing
        zy_i += tl.sum(tl.where((cols[None, :] == labels[:, None]) & valid, z, 0.0), axis=1)
        if WITH_ZSUM:
            zsum_i += tl.sum(tl.where(valid, z, 0.0), axis=1)
        if WITH_BEFORE:
            earlier = valid & (cols[None, :] < labels[:, None])
            before_i = tl.maximum(before_i, tl.max(tl.where(earlier, z, float("-inf")), axis=1))
        z_m = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z_m, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(z_m - m_new[:, None])
        if WITH_ENTROPY:
            shift = tl.where(s_i > 0, m_i - m_new, 0.0)
            zc = tl.where(valid, z - m_new[:, None], 0.0)
            t_i = alpha * (t_i + shift * s_i) + tl.sum(e * zc, axis=1)
        if WITH_SQ:
            q_i = q_i * (alpha * alpha) + tl.sum(e * e, axis=1)
        s_i = s_i * alpha + tl.sum(e, axis=1)
        m_i = m_new

    out = part_ptr + pid_s * LP_PLANES * N + rows
    tl.store(out + LP_MAX * N, m_i, mask=row_mask)
    tl.store(out + LP_SUM * N, s_i, mask=row_mask)
    tl.store(out + LP_TARGET * N, zy_i, mask=row_mask)
    tl.store(out + LP_ENT * N, t_i, mask=row_mask)
    tl.store(out + LP_SQ * N, q_i, mask=row_mask)
    tl.store(out + LP_ZSUM * N, zsum_i, mask=row_mask)
    tl.store(out + LP_BEFORE * N, before_i, mask=row_mask)


@triton.jit
def _logprobs_bwd_dz_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr,
    lse_ptr, g_ptr,                  # [N] fp32: saved lse; upstream d logp (0 ignored, NaN bad label)
    ge_ptr, mz_ptr,                  # [N] fp32: upstream d entropy (0 ignored), sum p z (if WITH_ENTROPY)
    cache_ptr,                       # [N, V] fp32 logits kept by the forward (read if FROM_CACHE)
    dz_ptr,                          # [N, VC] workspace (row stride stride_dzn), input dtype
    dbias_ptr,                       # [num row tiles, VC] fp32 column sums of dz (if NEED_BIAS)
    N, V, D, V0, VC,                 # this chunk holds vocabulary columns [V0, V0 + VC)
    stride_dzn, stride_dbn,
    inv_temp, cap,
    HEAD: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, NEED_BIAS: tl.constexpr, FROM_CACHE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = V0 + local
    row_mask = rows < N
    col_mask = local < VC
    mask = row_mask[:, None] & col_mask[None, :]
    if FROM_CACHE:
        z = _cached_tile(cache_ptr, rows, cols, mask, V)
    else:
        z = _logits_tile((h_ptr, w_ptr, b_ptr, D, inv_temp, cap), HEAD, rows, cols, row_mask, col_mask, BLOCK_D)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    p = tl.exp(z - lse[:, None])
    if WITH_ENTROPY:
        ge = tl.load(ge_ptr + rows, mask=row_mask, other=0.0)
        mz = tl.load(mz_ptr + rows, mask=row_mask, other=0.0)
        dz = -p * (g[:, None] + ge[:, None] * (z - mz[:, None]))
    else:
        dz = -p * g[:, None]
    dz += tl.where(cols[None, :] == labels[:, None], g[:, None], 0.0)
    dz = _chain(dz, z, inv_temp, cap, HEAD[1])
    dz = tl.where(mask, dz, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dzn + local[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_BIAS:
        tl.store(dbias_ptr + pid_n * stride_dbn + local, tl.sum(dz, axis=0), mask=col_mask)


# --------------------------------------------------------------------------- launchers


def logprobs_cache_shape(n: int, vocab: int, dtype: torch.dtype, opts: C.LogprobsOptions) -> tuple[int, ...]:
    """The cache ``logprobs_fwd`` returns: the fp32 logits ``[1, N, V]`` when kept, else ``(0,)``."""
    return (1, n, vocab) if cache_planes(n, vocab, 1, opts.cache) else (0,)


def logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                 opts: C.LogprobsOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's forward: ``(stats [LP_PLANES, N], cache)``, fp32 (see :func:`logprobs_cache_shape`)."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cache = hidden.new_empty(logprobs_cache_shape(n, vocab, hidden.dtype, opts), dtype=torch.float32)
    if n == 0 or vocab == 0:
        return C.empty_logprobs_stats(n, cache), cache
    hidden, weight = hidden.contiguous(), weight.contiguous()
    inv_temp, cap = opts.transform.kernel_params()
    local = labels - opts.vocab_start if opts.vocab_start else labels
    cfg = tile_config("logprobs_fwd", dev, (d,), hidden.dtype)
    n_row_tiles = triton.cdiv(n, cfg.block_n)
    splits, per = num_vocab_splits(n_row_tiles, triton.cdiv(vocab, cfg.block_v), dev)
    part = torch.empty(splits, C.LP_PLANES, n, dtype=torch.float32, device=dev)
    _logprobs_fwd_kernel[(n_row_tiles, splits)](
        hidden, weight, bias if bias is not None else hidden, local, part, cache if cache.numel() else part,
        n, vocab, d, per, inv_temp, 1.0 if cap is None else cap,
        HEAD=head_flags(bias, cap, hidden.dtype, dev),
        WITH_ENTROPY=opts.entropy, WITH_SQ=opts.log_sum_sq_probs, WITH_ZSUM=opts.mean_logits,
        WITH_BEFORE=opts.is_top1, STORE_CACHE=cache.numel() > 0,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        **cfg.launch_options(),
    )
    return C.merge_logprobs(part), cache


def logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, opts: C.LogprobsOptions,
                 need_hidden: bool, need_weight: bool, need_bias: bool):
    """The contract's backward: ``(d_hidden | None, d_weight | None, d_bias | None)`` in the inputs' dtypes.

    Reads the logits from ``cache`` when the forward kept them, else recomputes them."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cached = cache.numel() > 0
    cfg = tile_config("logprobs_bwd", dev, (d,), hidden.dtype)
    chunk = dz_chunk_columns(n, vocab, hidden.element_size(), cfg.block_v, cached)
    need_bias = need_bias and bias is not None
    acc = GradAccumulator(hidden, weight, bias, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias, chunks=triton.cdiv(vocab, max(chunk, 1)), rows=n, cols=chunk)
    if n == 0 or vocab == 0 or not acc.any:  # nothing to add: the accumulator's buffers are zeros
        return acc.result(bias)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    inv_temp, cap = opts.transform.kernel_params()
    local = labels - opts.vocab_start if opts.vocab_start else labels
    zero = torch.zeros(n, dtype=torch.float32, device=dev)
    g = g_logp.float()
    with_entropy = g_entropy is not None and entropy is not None
    if with_entropy:
        ge, mean_z = g_entropy.float(), lse - entropy.float()
    else:
        ge = mean_z = zero
    n_row_tiles = triton.cdiv(n, cfg.block_n)
    dz = torch.empty(n, chunk, dtype=hidden.dtype, device=dev)
    db_part = torch.empty(n_row_tiles, chunk, dtype=torch.float32, device=dev) if need_bias else zero
    for v0 in range(0, vocab, chunk):
        width = min(chunk, vocab - v0)
        grid = (n_row_tiles * triton.cdiv(width, cfg.block_v),)
        _logprobs_bwd_dz_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, local,
            lse, g, ge, mean_z, cache if cached else zero, dz, db_part,
            n, vocab, d, v0, width, dz.stride(0), db_part.stride(0) if need_bias else 0,
            inv_temp, 1.0 if cap is None else cap,
            HEAD=head_flags(bias, cap, hidden.dtype, dev),
            WITH_ENTROPY=with_entropy, NEED_BIAS=need_bias, FROM_CACHE=cached,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            **cfg.launch_options(),
        )
        acc.begin_chunk(v0, v0 + width)
        acc.add(dz[:, :width], hidden, weight[v0:v0 + width], 0, n, v0, v0 + width,
                bias_sums=db_part[:, :width].sum(0) if need_bias else None)
        acc.end_chunk(v0, v0 + width)
    return acc.result(bias)
