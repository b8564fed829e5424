"""Fused ``linear_divergence`` (docs/design.md §2.3): per-row KL / JSD between a student head and a
constant teacher head — and on request the student's entropy — without either ``[N x V]`` logits.

Math, per row, with each head's transform ``z = cap * tanh(u * inv_temp / cap)`` (``u * inv_temp``
without a softcap; ``u = h @ W.T + b``; each head has its own ``inv_temp = logit_scale / temperature``
and ``cap = softcap / temperature``, docs/design.md §2.1), ``log ps = zs - lse_s``, ``log pt = zt - lse_t``:
    forward_kl = sum pt (log pt - log ps) = [sum e^{zt - mt} (zt - zs)] / st - lse_t + lse_s
    reverse_kl = sum ps (log ps - log pt) = [sum e^{zs - ms} (zs - zt)] / ss - lse_s + lse_t
    jsd        = beta KL(pt || m) + (1 - beta) KL(ps || m),  m = beta pt + (1 - beta) ps
    entropy_s  = log ss - [sum e^{zs - ms} (zs - ms)] / ss                      (WITH_ENTROPY)
    d div / d zs:  forward_kl  ps - pt
                   reverse_kl  ps (log ps - log pt - reverse_kl)
                   jsd         (1 - beta) ps (log ps - log m - KL(ps || m))
then chained through the student's transform: ``* inv_temp_s (1 - (zs / cap_s)^2)``.  The backward's
``saved[N, 3]`` is (lse_s, lse_t, aux) with aux = reverse_kl (reverse) or KL(ps || m) (jsd), 0 (forward).

Forward (``_divergence_fwd_kernel``): grid (row tiles, vocabulary splits); both heads' logits tiles per
vocabulary tile, online max / sum-exp for both, the one rescaled cross term forward / reverse KL need
(``DV_CROSS``) and the student entropy term ``DV_SENT`` (kept relative to the running max, as in
``linear_logprobs``); partial statistics ``[SPLITS, DV_PLANES, N]`` merged by
``contract.merge_divergence`` (docs/design.md §3.3).  JSD needs both log-sum-exps before ``log m``
exists, so it takes a second pass (``_divergence_jsd_kernel``) for the two KL planes, against the
merged lse's (or those of a sharded call, ``lse_st``).  With ``STORE_CACHE`` (both heads' fp32 logits
fit the cache share of the workspace budget and a backward will run) the first pass stores the tiles
into the cache ``[2, N, V]``, and the JSD pass and the backward read them instead of recomputing.
    FLOPs 2NV(Ds + Dt) per pass that recomputes; HBM bytes ~ N(Ds + Dt)e + per-row-tile head reads
    (mostly L2 hits) + O(N) (+ 8NV written with the cache).

Backward: same design as ``linear_logprobs`` (its docstring and docs/design.md §5):
``_divergence_bwd_dz_kernel`` recomputes both heads' tiles from ``saved`` (or reads them from the cache,
``FROM_CACHE``) and writes the student's ``dz`` (input dtype) for one vocabulary chunk into a bounded
workspace, with d bias as per-row-tile column sums; library GEMMs then give ``d W_s[chunk] = dz.T @ hs``
(complete) and ``d hs (+)= dz @ W_s[chunk]`` (fp32 across chunks).  Deterministic, no atomics; the
teacher receives nothing.  Rows are masked by the caller (``contract.finish_divergence``).
"""

from __future__ import annotations

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

# Kinds and statistic planes as compile-time constants of the kernels (the values of ``contract``).
FORWARD_KL = tl.constexpr(int(C.Kind.FORWARD_KL))
REVERSE_KL = tl.constexpr(int(C.Kind.REVERSE_KL))
DV_SMAX = tl.constexpr(C.DV_SMAX)
DV_SSUM = tl.constexpr(C.DV_SSUM)
DV_TMAX = tl.constexpr(C.DV_TMAX)
DV_TSUM = tl.constexpr(C.DV_TSUM)
DV_CROSS = tl.constexpr(C.DV_CROSS)
DV_SENT = tl.constexpr(C.DV_SENT)
DV_KLT = tl.constexpr(C.DV_KLT)
DV_KLS = tl.constexpr(C.DV_KLS)
DV_PLANES = tl.constexpr(C.DV_PLANES)

# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _log_mixture(log_ps, log_pt, log_beta, log_1m_beta):
    """``log(beta pt + (1 - beta) ps)`` in log space."""
    a = log_pt + log_beta
    b = log_ps + log_1m_beta
    hi = tl.maximum(a, b)
    return hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))


@triton.jit
def _both_tiles(s_head, S_HEAD: tl.constexpr, t_head, T_HEAD: tl.constexpr, s_cache_ptr, t_cache_ptr,
                FROM_CACHE: tl.constexpr, rows, cols, row_mask, col_mask, V, BLOCK_D: tl.constexpr):
    """The student's and the teacher's logits tiles: read from the cache planes ``[N, V]``, or computed."""
    if FROM_CACHE:
        mask = row_mask[:, None] & col_mask[None, :]
        zs = _cached_tile(s_cache_ptr, rows, cols, mask, V)
        zt = _cached_tile(t_cache_ptr, rows, cols, mask, V)
    else:
        zs = _logits_tile(s_head, S_HEAD, rows, cols, row_mask, col_mask, BLOCK_D)
        zt = _logits_tile(t_head, T_HEAD, rows, cols, row_mask, col_mask, BLOCK_D)
    return zs, zt


# --------------------------------------------------------------------------- kernels


@triton.jit
def _divergence_fwd_kernel(
    hs_ptr, ws_ptr, bs_ptr,          # student hidden [N, DS], head [V, DS], bias [V]
    ht_ptr, wt_ptr, bt_ptr,          # teacher hidden [N, DT], head [V, DT], bias [V]
    part_ptr,                        # [SPLITS, DV_PLANES, N] fp32 partial statistics (KL planes: 0)
    s_cache_ptr, t_cache_ptr,        # [N, V] fp32 logits of the student, of the teacher (if STORE_CACHE)
    N, V, DS, DT, TILES_PER_SPLIT,
    s_inv_temp, s_cap, t_inv_temp, t_cap,
    KIND: tl.constexpr,              # contract.Kind
    S_HEAD: tl.constexpr, T_HEAD: tl.constexpr,  # (HAS_BIAS, HAS_SOFTCAP, DOT_F32, PRECISION) per head
    WITH_ENTROPY: tl.constexpr, STORE_CACHE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    v_start = pid_s * TILES_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(V, v_start + TILES_PER_SPLIT * BLOCK_V)
    s_head = (hs_ptr, ws_ptr, bs_ptr, DS, s_inv_temp, s_cap)
    t_head = (ht_ptr, wt_ptr, bt_ptr, DT, t_inv_temp, t_cap)

    ms = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    mt = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    st = tl.zeros([BLOCK_N], dtype=tl.float32)
    cross = tl.zeros([BLOCK_N], dtype=tl.float32)
    sent = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        zs, zt = _both_tiles(s_head, S_HEAD, t_head, T_HEAD, s_cache_ptr, t_cache_ptr, False, rows, cols, row_mask,
                             col_mask, V, BLOCK_D)
        if STORE_CACHE:
            mask = row_mask[:, None] & col_mask[None, :]
            _store_tile(s_cache_ptr, zs, rows, cols, mask, V)
            _store_tile(t_cache_ptr, zt, rows, cols, mask, V)
        valid = col_mask[None, :]
        zs_m = tl.where(valid, zs, float("-inf"))
        zt_m = tl.where(valid, zt, float("-inf"))
        ms_new = tl.maximum(ms, tl.max(zs_m, axis=1))
        mt_new = tl.maximum(mt, tl.max(zt_m, axis=1))
        rs = tl.exp(ms - ms_new)
        rt = tl.exp(mt - mt_new)
        es = tl.exp(zs_m - ms_new[:, None])
        et = tl.exp(zt_m - mt_new[:, None])
        if KIND == FORWARD_KL:
            cross = cross * rt + tl.sum(tl.where(valid, et * (zt - zs), 0.0), axis=1)
        elif KIND == REVERSE_KL:
            cross = cross * rs + tl.sum(tl.where(valid, es * (zs - zt), 0.0), axis=1)
        if WITH_ENTROPY:  # relative to the running max, as linear_logprobs' entropy
            shift = tl.where(ss > 0, ms - ms_new, 0.0)
            sent = rs * (sent + shift * ss) + tl.sum(tl.where(valid, es * (zs - ms_new[:, None]), 0.0), axis=1)
        ss = ss * rs + tl.sum(es, axis=1)
        st = st * rt + tl.sum(et, axis=1)
        ms = ms_new
        mt = mt_new

    out = part_ptr + pid_s * DV_PLANES * N + rows
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    tl.store(out + DV_SMAX * N, ms, mask=row_mask)
    tl.store(out + DV_SSUM * N, ss, mask=row_mask)
    tl.store(out + DV_TMAX * N, mt, mask=row_mask)
    tl.store(out + DV_TSUM * N, st, mask=row_mask)
    tl.store(out + DV_CROSS * N, cross, mask=row_mask)
    tl.store(out + DV_SENT * N, sent, mask=row_mask)
    tl.store(out + DV_KLT * N, zero, mask=row_mask)
    tl.store(out + DV_KLS * N, zero, mask=row_mask)


@triton.jit
def _divergence_jsd_kernel(
    hs_ptr, ws_ptr, bs_ptr,
    ht_ptr, wt_ptr, bt_ptr,
    lse_ptr,                         # [N, 2] fp32: merged lse_s, lse_t
    part_ptr,                        # [2, SPLITS, N] fp32: KL(pt || m), KL(ps || m)
    s_cache_ptr, t_cache_ptr,        # [N, V] fp32 logits of each head (read if FROM_CACHE)
    N, V, DS, DT, SPLITS, TILES_PER_SPLIT,
    s_inv_temp, s_cap, t_inv_temp, t_cap, log_beta, log_1m_beta,
    S_HEAD: tl.constexpr, T_HEAD: tl.constexpr, FROM_CACHE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    lse_s = tl.load(lse_ptr + rows * 2, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
    v_start = pid_s * TILES_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(V, v_start + TILES_PER_SPLIT * BLOCK_V)
    s_head = (hs_ptr, ws_ptr, bs_ptr, DS, s_inv_temp, s_cap)
    t_head = (ht_ptr, wt_ptr, bt_ptr, DT, t_inv_temp, t_cap)

    kl_t = tl.zeros([BLOCK_N], dtype=tl.float32)
    kl_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        zs, zt = _both_tiles(s_head, S_HEAD, t_head, T_HEAD, s_cache_ptr, t_cache_ptr, FROM_CACHE, rows, cols,
                             row_mask, col_mask, V, BLOCK_D)
        log_ps = zs - lse_s[:, None]
        log_pt = zt - lse_t[:, None]
        log_m = _log_mixture(log_ps, log_pt, log_beta, log_1m_beta)
        kl_t += tl.sum(tl.where(col_mask[None, :], tl.exp(log_pt) * (log_pt - log_m), 0.0), axis=1)
        kl_s += tl.sum(tl.where(col_mask[None, :], tl.exp(log_ps) * (log_ps - log_m), 0.0), axis=1)

    out = part_ptr + pid_s * N + rows
    tl.store(out, kl_t, mask=row_mask)
    tl.store(out + SPLITS * N, kl_s, mask=row_mask)


@triton.jit
def _divergence_bwd_dz_kernel(
    hs_ptr, ws_ptr, bs_ptr,
    ht_ptr, wt_ptr, bt_ptr,
    saved_ptr,                       # [N, 3] fp32: lse_s, lse_t, aux
    g_ptr,                           # [N] fp32 upstream gradient (0 on ignored rows)
    s_cache_ptr, t_cache_ptr,        # [N, V] fp32 logits of each head (read if FROM_CACHE)
    dz_ptr,                          # [N, VC] workspace (row stride stride_dzn), student dtype
    dbias_ptr,                       # [num row tiles, VC] fp32 (if NEED_BIAS)
    N, V, DS, DT, V0, VC,
    stride_dzn, stride_dbn,
    s_inv_temp, s_cap, t_inv_temp, t_cap, log_beta, log_1m_beta, one_m_beta,
    KIND: tl.constexpr, S_HEAD: tl.constexpr, T_HEAD: tl.constexpr,
    NEED_BIAS: tl.constexpr, FROM_CACHE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = V0 + local
    row_mask = rows < N
    col_mask = local < VC
    s_head = (hs_ptr, ws_ptr, bs_ptr, DS, s_inv_temp, s_cap)
    t_head = (ht_ptr, wt_ptr, bt_ptr, DT, t_inv_temp, t_cap)
    zs, zt = _both_tiles(s_head, S_HEAD, t_head, T_HEAD, s_cache_ptr, t_cache_ptr, FROM_CACHE, rows, cols,
                         row_mask, col_mask, V, BLOCK_D)
    lse_s = tl.load(saved_ptr + rows * 3, mask=row_mask, other=0.0)
    lse_t = tl.load(saved_ptr + rows * 3 + 1, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    log_ps = zs - lse_s[:, None]
    log_pt = zt - lse_t[:, None]
    ps = tl.exp(log_ps)
    if KIND == FORWARD_KL:
        dz = ps - tl.exp(log_pt)
    elif KIND == REVERSE_KL:
        aux = tl.load(saved_ptr + rows * 3 + 2, mask=row_mask, other=0.0)
        dz = ps * (log_ps - log_pt - aux[:, None])
    else:  # JSD
        aux = tl.load(saved_ptr + rows * 3 + 2, mask=row_mask, other=0.0)
        log_m = _log_mixture(log_ps, log_pt, log_beta, log_1m_beta)
        dz = one_m_beta * ps * (log_ps - log_m - aux[:, None])
    dz = _chain(dz * g[:, None], zs, s_inv_temp, s_cap, S_HEAD[1])
    mask = row_mask[:, None] & col_mask[None, :]
    dz = tl.where(mask, dz, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dzn + local[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_BIAS:
        tl.store(dbias_ptr + pid_n * stride_dbn + local, tl.sum(dz, axis=0), mask=col_mask)


# --------------------------------------------------------------------------- launchers


def _heads(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, opts: C.DivergenceOptions) -> tuple:
    """``(tensors, scalars, constexprs)`` of both heads, in the kernels' argument order."""
    s_inv, s_cap = opts.student.kernel_params()
    t_inv, t_cap = opts.teacher.kernel_params()
    tensors = (s_hidden, s_weight, s_bias if s_bias is not None else s_hidden,
               t_hidden, t_weight, t_bias if t_bias is not None else t_hidden)
    scalars = (s_inv, 1.0 if s_cap is None else s_cap, t_inv, 1.0 if t_cap is None else t_cap)
    flags = dict(S_HEAD=head_flags(s_bias, s_cap, s_hidden.dtype, s_hidden.device),
                 T_HEAD=head_flags(t_bias, t_cap, t_hidden.dtype, t_hidden.device))
    return tensors, scalars, flags


def _planes(cache: torch.Tensor, stand_in: torch.Tensor) -> tuple:
    """The student's and the teacher's cache planes (``stand_in`` twice without a cache)."""
    return (cache[0], cache[1]) if cache.numel() else (stand_in, stand_in)


def _dtype(s_hidden, t_hidden) -> torch.dtype:
    """The operand class decides the tiles: fp32 if either head is fp32."""
    return torch.promote_types(s_hidden.dtype, t_hidden.dtype)


def divergence_cache_shape(n: int, vocab: int, dtype: torch.dtype, opts: C.DivergenceOptions) -> tuple[int, ...]:
    """The cache ``divergence_fwd`` returns without ``lse_st``: both heads' fp32 logits ``[2, N, V]``
    when kept, else ``(0,)``."""
    return (2, n, vocab) if cache_planes(n, vocab, 2, opts.cache) else (0,)


def divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, opts: C.DivergenceOptions):
    """The contract's forward: ``(stats [DV_PLANES, N], cache)``, fp32.  With ``lse_st`` (the merged
    lse's of a sharded JSD): the two KL planes only, and no cache."""
    n, ds = s_hidden.shape
    dt = t_hidden.shape[1]
    vocab = s_weight.shape[0]
    dev = s_hidden.device
    shape = divergence_cache_shape(n, vocab, s_hidden.dtype, opts) if lse_st is None else (0,)
    cache = s_hidden.new_empty(shape, dtype=torch.float32)
    stats = C.empty_divergence_stats(n, cache)
    if n == 0 or vocab == 0:
        return stats, cache
    s_hidden, s_weight, t_hidden, t_weight = (t.contiguous() for t in (s_hidden, s_weight, t_hidden, t_weight))
    cfg = tile_config("divergence_fwd", dev, (ds, dt), _dtype(s_hidden, t_hidden))
    n_row_tiles = triton.cdiv(n, cfg.block_n)
    splits, per = num_vocab_splits(n_row_tiles, triton.cdiv(vocab, cfg.block_v), dev)
    tensors, scalars, flags = _heads(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, opts)
    cached = cache.numel() > 0
    blocks = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, **cfg.launch_options())

    if lse_st is None:
        part = torch.empty(splits, C.DV_PLANES, n, dtype=torch.float32, device=dev)
        _divergence_fwd_kernel[(n_row_tiles, splits)](
            *tensors, part, *_planes(cache, part), n, vocab, ds, dt, per, *scalars,
            KIND=int(opts.kind), **flags, WITH_ENTROPY=opts.entropy, STORE_CACHE=cached, **blocks,
        )
        stats = C.merge_divergence(part, opts.kind)
    if opts.kind == C.Kind.JSD and (lse_st is not None or C.covers_vocabulary(opts, vocab)):
        lse = (C.divergence_lse(stats) if lse_st is None else lse_st.float()).contiguous()
        kl = torch.empty(2, splits, n, dtype=torch.float32, device=dev)
        _divergence_jsd_kernel[(n_row_tiles, splits)](
            *tensors, lse, kl, *_planes(cache, kl), n, vocab, ds, dt, splits, per, *scalars,
            *C.log_mixture_consts(opts.beta), **flags, FROM_CACHE=cached, **blocks,
        )
        stats[C.DV_KLT], stats[C.DV_KLS] = kl[0].sum(0), kl[1].sum(0)
    return stats, cache


def divergence_bwd(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache,
                   opts: C.DivergenceOptions, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Student-side ``(d_hidden | None, d_weight | None, d_bias | None)`` in the student's dtypes; reads
    both heads' logits from ``cache`` when the forward kept them, else recomputes them."""
    n, ds = s_hidden.shape
    dt = t_hidden.shape[1]
    vocab = s_weight.shape[0]
    dev = s_hidden.device
    cached = cache.numel() > 0
    need_bias = need_bias and s_bias is not None
    cfg = tile_config("divergence_bwd", dev, (ds, dt), _dtype(s_hidden, t_hidden))
    chunk = dz_chunk_columns(n, vocab, s_hidden.element_size(), cfg.block_v, cached)
    acc = GradAccumulator(s_hidden, s_weight, s_bias, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias, chunks=triton.cdiv(vocab, max(chunk, 1)), rows=n, cols=chunk)
    if n == 0 or vocab == 0 or not acc.any:  # nothing to add: the accumulator's buffers are zeros
        return acc.result(s_bias)
    s_hidden, s_weight, t_hidden, t_weight = (t.contiguous() for t in (s_hidden, s_weight, t_hidden, t_weight))
    g = grad.float()
    saved = saved.float().contiguous()
    tensors, scalars, flags = _heads(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, opts)
    n_row_tiles = triton.cdiv(n, cfg.block_n)
    dz = torch.empty(n, chunk, dtype=s_hidden.dtype, device=dev)
    db_part = torch.empty(n_row_tiles, chunk, dtype=torch.float32, device=dev) if need_bias else g
    for v0 in range(0, vocab, chunk):
        width = min(chunk, vocab - v0)
        grid = (n_row_tiles * triton.cdiv(width, cfg.block_v),)
        _divergence_bwd_dz_kernel[grid](
            *tensors, saved, g, *_planes(cache, g), dz, db_part,
            n, vocab, ds, dt, v0, width, dz.stride(0), db_part.stride(0) if need_bias else 0,
            *scalars, *C.log_mixture_consts(opts.beta), 1.0 - opts.beta,
            KIND=int(opts.kind), **flags, NEED_BIAS=need_bias, FROM_CACHE=cached,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            **cfg.launch_options(),
        )
        acc.begin_chunk(v0, v0 + width)
        acc.add(dz[:, :width], s_hidden, s_weight[v0:v0 + width], 0, n, v0, v0 + width,
                bias_sums=db_part[:, :width].sum(0) if need_bias else None)
        acc.end_chunk(v0, v0 + width)
    return acc.result(s_bias)
