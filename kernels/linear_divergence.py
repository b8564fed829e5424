"""Fused ``linear_divergence`` (docs/design.md §2.3): per-row KL / JSD between a student head and a
constant teacher head, without either ``[N x V]`` logits.

Math, per row with ``zs``, ``zt`` the two heads' logits (bias, temperature, softcap applied),
``log ps = zs - lse_s``, ``log pt = zt - lse_t``:
    forward_kl = sum pt (log pt - log ps) = [sum e^{zt - mt} (zt - zs)] / st - lse_t + lse_s
    reverse_kl = sum ps (log ps - log pt) = [sum e^{zs - ms} (zs - zt)] / ss - lse_s + lse_t
    jsd        = beta KL(pt || m) + (1 - beta) KL(ps || m),  m = beta pt + (1 - beta) ps
    d div / d zs:  forward_kl  ps - pt
                   reverse_kl  ps (log ps - log pt - reverse_kl)
                   jsd         (1 - beta) ps (log ps - log m - KL(ps || m))
then chained through the student's softcap and temperature.  ``stats[N, 3]`` saves
(lse_s, lse_t, aux) with aux = reverse_kl (kind 1) or KL(ps || m) (kind 2), 0 for kind 0.

Forward (``_divergence_fwd_kernel``): grid (row tiles, vocabulary splits); both heads' logits
tiles per vocabulary tile, online max / sum-exp for both, and the one rescaled cross term that
forward / reverse KL need.  JSD needs both log-sum-exps before ``log m`` can be formed, so it takes
a second pass (``_divergence_jsd_kernel``) over the vocabulary with the merged lse's.
    FLOPs 2NV(Ds + Dt) per pass (x2 for JSD); HBM bytes ~ N(Ds + Dt)e + per-row-tile head reads
    (mostly L2 hits) + O(N).

Backward: same design as ``linear_logprobs`` (see its docstring for the arithmetic):
``_divergence_bwd_dz_kernel`` recomputes both heads' tiles from ``stats`` and writes the
student's ``dz`` (input dtype) for one vocabulary chunk into a bounded workspace, with d bias as
per-row-tile column sums; library GEMMs then give ``d W_s[chunk] = dz.T @ hs`` (complete) and
``d hs (+)= dz @ W_s[chunk]`` (fp32 across chunks).  Deterministic, no atomics; the teacher
receives nothing.  Rows with ``labels == ignore_index`` give 0 and no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import contract as C
from ..backends.tiling import GradAccumulator, plan_chunk_columns
from ._tiles import _grouped_pid, _logits_tile, dot_flags, num_vocab_splits, tile_config

# Kinds as compile-time constants of the kernels (the values of ``contract.Kind``).
FORWARD_KL = tl.constexpr(int(C.Kind.FORWARD_KL))
REVERSE_KL = tl.constexpr(int(C.Kind.REVERSE_KL))

# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _log_mixture(log_ps, log_pt, log_beta, log_1m_beta):
    """``log(beta pt + (1 - beta) ps)`` in log space."""
    a = log_pt + log_beta
    b = log_ps + log_1m_beta
    hi = tl.maximum(a, b)
    return hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))


# --------------------------------------------------------------------------- kernels


@triton.jit
def _divergence_fwd_kernel(
    # pointers
    hs_ptr, ws_ptr, bs_ptr,          # student hidden [N, DS], head [V, DS], bias [V]
    ht_ptr, wt_ptr, bt_ptr,          # teacher hidden [N, DT], head [V, DT], bias [V]
    part_ptr,                        # [5, SPLITS, N] fp32: ms, ss, mt, st, cross term
    # sizes
    N, V, DS, DT, SPLITS, TILES_PER_SPLIT,
    # strides
    stride_hsn, stride_hsd, stride_wsv, stride_wsd,
    stride_htn, stride_htd, stride_wtv, stride_wtd,
    # scalars
    inv_temp, s_softcap, t_softcap,
    # constexprs
    KIND: tl.constexpr,
    S_HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr, S_HAS_SOFTCAP: tl.constexpr, T_HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    S_DOT_F32: tl.constexpr, S_PRECISION: tl.constexpr, T_DOT_F32: tl.constexpr, T_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    v_start = pid_s * TILES_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(V, v_start + TILES_PER_SPLIT * BLOCK_V)

    ms = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    mt = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    st = tl.zeros([BLOCK_N], dtype=tl.float32)
    cross = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        zs = _logits_tile(
            hs_ptr, ws_ptr, bs_ptr, rows, cols, N, V, DS, stride_hsn, stride_hsd, stride_wsv, stride_wsd,
            inv_temp, s_softcap, S_HAS_BIAS, S_HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, S_DOT_F32, S_PRECISION,
        )
        zt = _logits_tile(
            ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, DT, stride_htn, stride_htd, stride_wtv, stride_wtd,
            inv_temp, t_softcap, T_HAS_BIAS, T_HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, T_DOT_F32, T_PRECISION,
        )
        zs_m = tl.where(col_mask[None, :], zs, float("-inf"))
        zt_m = tl.where(col_mask[None, :], zt, float("-inf"))
        ms_new = tl.maximum(ms, tl.max(zs_m, axis=1))
        mt_new = tl.maximum(mt, tl.max(zt_m, axis=1))
        rs = tl.exp(ms - ms_new)
        rt = tl.exp(mt - mt_new)
        es = tl.exp(zs_m - ms_new[:, None])
        et = tl.exp(zt_m - mt_new[:, None])
        if KIND == FORWARD_KL:
            cross = cross * rt + tl.sum(tl.where(col_mask[None, :], et * (zt - zs), 0.0), axis=1)
        elif KIND == REVERSE_KL:
            cross = cross * rs + tl.sum(tl.where(col_mask[None, :], es * (zs - zt), 0.0), axis=1)
        ss = ss * rs + tl.sum(es, axis=1)
        st = st * rt + tl.sum(et, axis=1)
        ms = ms_new
        mt = mt_new

    out = part_ptr + pid_s * N + rows
    plane = SPLITS * N
    tl.store(out, ms, mask=row_mask)
    tl.store(out + plane, ss, mask=row_mask)
    tl.store(out + 2 * plane, mt, mask=row_mask)
    tl.store(out + 3 * plane, st, mask=row_mask)
    tl.store(out + 4 * plane, cross, mask=row_mask)


@triton.jit
def _divergence_jsd_kernel(
    # pointers
    hs_ptr, ws_ptr, bs_ptr,
    ht_ptr, wt_ptr, bt_ptr,
    stats_ptr,                       # [N, 3] fp32: lse_s, lse_t (read)
    part_ptr,                        # [2, SPLITS, N] fp32: KL(pt || m), KL(ps || m)
    # sizes
    N, V, DS, DT, SPLITS, TILES_PER_SPLIT,
    # strides
    stride_hsn, stride_hsd, stride_wsv, stride_wsd,
    stride_htn, stride_htd, stride_wtv, stride_wtd,
    stride_stn,
    # scalars
    inv_temp, s_softcap, t_softcap, log_beta, log_1m_beta,
    # constexprs
    S_HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr, S_HAS_SOFTCAP: tl.constexpr, T_HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    S_DOT_F32: tl.constexpr, S_PRECISION: tl.constexpr, T_DOT_F32: tl.constexpr, T_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    lse_s = tl.load(stats_ptr + rows * stride_stn, mask=row_mask, other=0.0)
    lse_t = tl.load(stats_ptr + rows * stride_stn + 1, mask=row_mask, other=0.0)
    v_start = pid_s * TILES_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(V, v_start + TILES_PER_SPLIT * BLOCK_V)

    kl_t = tl.zeros([BLOCK_N], dtype=tl.float32)
    kl_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        zs = _logits_tile(
            hs_ptr, ws_ptr, bs_ptr, rows, cols, N, V, DS, stride_hsn, stride_hsd, stride_wsv, stride_wsd,
            inv_temp, s_softcap, S_HAS_BIAS, S_HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, S_DOT_F32, S_PRECISION,
        )
        zt = _logits_tile(
            ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, DT, stride_htn, stride_htd, stride_wtv, stride_wtd,
            inv_temp, t_softcap, T_HAS_BIAS, T_HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, T_DOT_F32, T_PRECISION,
        )
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
    # pointers
    hs_ptr, ws_ptr, bs_ptr,
    ht_ptr, wt_ptr, bt_ptr,
    stats_ptr,                       # [N, 3] fp32: lse_s, lse_t, aux
    g_ptr,                           # [N] fp32 upstream gradient (0 on ignored rows)
    dz_ptr,                          # [N, Vc] workspace, student dtype
    dbias_ptr,                       # [num row tiles, Vc] fp32 (if NEED_BIAS)
    # sizes
    N, V, DS, DT, V0, VC,
    # strides
    stride_hsn, stride_hsd, stride_wsv, stride_wsd,
    stride_htn, stride_htd, stride_wtv, stride_wtd,
    stride_stn, stride_dzn, stride_dbn,
    # scalars
    inv_temp, s_softcap, t_softcap, log_beta, log_1m_beta, one_m_beta,
    # constexprs
    KIND: tl.constexpr, NEED_BIAS: tl.constexpr,
    S_HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr, S_HAS_SOFTCAP: tl.constexpr, T_HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    S_DOT_F32: tl.constexpr, S_PRECISION: tl.constexpr, T_DOT_F32: tl.constexpr, T_PRECISION: tl.constexpr,
):
    pid_n, pid_v = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = V0 + local
    row_mask = rows < N
    col_mask = local < VC
    zs = _logits_tile(
        hs_ptr, ws_ptr, bs_ptr, rows, cols, N, V, DS, stride_hsn, stride_hsd, stride_wsv, stride_wsd,
        inv_temp, s_softcap, S_HAS_BIAS, S_HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, S_DOT_F32, S_PRECISION,
    )
    zt = _logits_tile(
        ht_ptr, wt_ptr, bt_ptr, rows, cols, N, V, DT, stride_htn, stride_htd, stride_wtv, stride_wtd,
        inv_temp, t_softcap, T_HAS_BIAS, T_HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, T_DOT_F32, T_PRECISION,
    )
    lse_s = tl.load(stats_ptr + rows * stride_stn, mask=row_mask, other=0.0)
    lse_t = tl.load(stats_ptr + rows * stride_stn + 1, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    log_ps = zs - lse_s[:, None]
    log_pt = zt - lse_t[:, None]
    ps = tl.exp(log_ps)
    if KIND == FORWARD_KL:
        dz = ps - tl.exp(log_pt)
    elif KIND == REVERSE_KL:
        aux = tl.load(stats_ptr + rows * stride_stn + 2, mask=row_mask, other=0.0)
        dz = ps * (log_ps - log_pt - aux[:, None])
    else:
        aux = tl.load(stats_ptr + rows * stride_stn + 2, mask=row_mask, other=0.0)
        log_m = _log_mixture(log_ps, log_pt, log_beta, log_1m_beta)
        dz = one_m_beta * ps * (log_ps - log_m - aux[:, None])
    dz = dz * g[:, None]
    if S_HAS_SOFTCAP:
        zc = zs / s_softcap
        dz = dz * (1.0 - zc * zc)
    dz = dz * inv_temp
    mask = row_mask[:, None] & col_mask[None, :]
    dz = tl.where(mask, dz, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dzn + local[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_BIAS:
        tl.store(dbias_ptr + pid_n * stride_dbn + local, tl.sum(dz, axis=0), mask=col_mask)


# --------------------------------------------------------------------------- launchers


def _head_args(hidden: torch.Tensor, weight: torch.Tensor) -> tuple:
    return hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1)


def _flags(s_hidden, t_hidden, s_bias, t_bias, s_cap, t_cap) -> dict:
    s_f32, s_prec = dot_flags(s_hidden.dtype, s_hidden.device)
    t_f32, t_prec = dot_flags(t_hidden.dtype, t_hidden.device)
    return dict(
        S_HAS_BIAS=s_bias is not None, T_HAS_BIAS=t_bias is not None,
        S_HAS_SOFTCAP=s_cap is not None, T_HAS_SOFTCAP=t_cap is not None,
        S_DOT_F32=s_f32, S_PRECISION=s_prec, T_DOT_F32=t_f32, T_PRECISION=t_prec,
    )


def _scalars(opts: C.DivergenceOptions) -> tuple[float, float, float]:
    """``(inv_temp, s_cap, t_cap)``: the kernels take one ``inv_temp`` for both heads, so
    ``triton_ops.unsupported`` only sends calls whose heads share it."""
    inv_temp, s_cap = opts.student.kernel_params()
    _, t_cap = opts.teacher.kernel_params()
    return inv_temp, 1.0 if s_cap is None else s_cap, 1.0 if t_cap is None else t_cap


def divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, opts: C.DivergenceOptions):
    """The contract's forward: ``(stats [DV_PLANES, N], empty cache)``, fp32 (no student entropy plane
    yet: ``triton_ops.unsupported`` routes such calls elsewhere)."""
    n, ds = s_hidden.shape
    dt = t_hidden.shape[1]
    vocab = s_weight.shape[0]
    dev = s_hidden.device
    cache = s_hidden.new_empty(0, dtype=torch.float32)
    stats = C.empty_divergence_stats(n, cache)
    if n == 0:
        return stats, cache
    _, s_cap = opts.student.kernel_params()
    _, t_cap = opts.teacher.kernel_params()
    cfg = tile_config("divergence_fwd", dev, (ds, dt))
    n_row_tiles = triton.cdiv(n, cfg.block_n)
    splits, per = num_vocab_splits(n_row_tiles, triton.cdiv(vocab, cfg.block_v), dev)
    flags = _flags(s_hidden, t_hidden, s_bias, t_bias, s_cap, t_cap)
    scal = _scalars(opts)
    heads = (s_hidden, s_weight, s_bias if s_bias is not None else s_hidden,
             t_hidden, t_weight, t_bias if t_bias is not None else t_hidden)
    strides = _head_args(s_hidden, s_weight) + _head_args(t_hidden, t_weight)
    blocks = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if lse_st is None:
        part = torch.empty(5, splits, n, dtype=torch.float32, device=dev)
        _divergence_fwd_kernel[(n_row_tiles, splits)](
            *heads, part, n, vocab, ds, dt, splits, per, *strides, *scal, KIND=int(opts.kind), **flags, **blocks,
        )
        parts = stats.unsqueeze(0).repeat(splits, 1, 1)
        parts[:, [C.DV_SMAX, C.DV_SSUM, C.DV_TMAX, C.DV_TSUM, C.DV_CROSS]] = part.transpose(0, 1)
        stats = C.merge_divergence(parts, opts.kind)
    if opts.kind == C.Kind.JSD and (lse_st is not None or C.covers_vocabulary(opts, vocab)):
        lse = C.divergence_lse(stats) if lse_st is None else lse_st.float()
        saved = torch.stack([lse[:, 0], lse[:, 1], torch.zeros_like(lse[:, 0])], 1).contiguous()
        kl = torch.empty(2, splits, n, dtype=torch.float32, device=dev)
        _divergence_jsd_kernel[(n_row_tiles, splits)](
            *heads, saved, kl, n, vocab, ds, dt, splits, per, *strides, saved.stride(0), *scal,
            *C.log_mixture_consts(opts.beta), **flags, **blocks,
        )
        stats[C.DV_KLT], stats[C.DV_KLS] = kl[0].sum(0), kl[1].sum(0)
    return stats, cache


def divergence_bwd(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache,
                   opts: C.DivergenceOptions, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Student-side ``(d_hidden | None, d_weight | None, d_bias | None)`` in the student's dtypes."""
    n, ds = s_hidden.shape
    dt = t_hidden.shape[1]
    vocab = s_weight.shape[0]
    dev = s_hidden.device
    need_bias = need_bias and s_bias is not None
    cfg = tile_config("divergence_bwd", dev, (ds, dt))
    chunk = plan_chunk_columns(n, vocab, elem_bytes=s_hidden.element_size(), multiple=cfg.block_v)
    acc = GradAccumulator(s_hidden, s_weight, s_bias, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias, chunks=triton.cdiv(vocab, chunk), rows=n, cols=chunk)
    if n == 0 or not acc.any:
        return acc.result(s_bias)
    _, s_cap = opts.student.kernel_params()
    _, t_cap = opts.teacher.kernel_params()
    g = grad.float()
    saved = saved.float().contiguous()
    flags = _flags(s_hidden, t_hidden, s_bias, t_bias, s_cap, t_cap)
    n_row_tiles = triton.cdiv(n, cfg.block_n)
    dz = torch.empty(n, chunk, dtype=s_hidden.dtype, device=dev)
    db_part = torch.empty(n_row_tiles, chunk, dtype=torch.float32, device=dev) if need_bias else g
    for v0 in range(0, vocab, chunk):
        width = min(chunk, vocab - v0)
        grid = (n_row_tiles * triton.cdiv(width, cfg.block_v),)
        _divergence_bwd_dz_kernel[grid](
            s_hidden, s_weight, s_bias if s_bias is not None else s_hidden,
            t_hidden, t_weight, t_bias if t_bias is not None else t_hidden,
            saved, g, dz, db_part,
            n, vocab, ds, dt, v0, width,
            *_head_args(s_hidden, s_weight), *_head_args(t_hidden, t_weight),
            saved.stride(0), dz.stride(0), db_part.stride(0) if need_bias else 0,
            *_scalars(opts), *C.log_mixture_consts(opts.beta), 1.0 - opts.beta,
            KIND=int(opts.kind), NEED_BIAS=need_bias, **flags,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        acc.begin_chunk(v0, v0 + width)
        acc.add(dz[:, :width], s_hidden, s_weight[v0:v0 + width], 0, n, v0, v0 + width,
                bias_sums=db_part[:, :width].sum(0) if need_bias else None)
        acc.end_chunk(v0, v0 + width)
    return acc.result(s_bias)
