"""Fused ``linear_logprobs`` (docs/design.md §2.2): per-row log-prob of the label and entropy under an LM
head, without the ``[N x V]`` logits.

Math, per row with ``z = cap * tanh((h @ W.T + b) * inv_temp / cap)`` (the contract's transform,
docs/design.md §2.1):
    lse = logsumexp(z),  logp = z[label] - lse,  entropy = lse - sum softmax(z) * z
          (computed as log s - sum e^{z-m} (z-m) / s with m the row max: no cancellation)
    dz  = g_logp (onehot(label) - p) - g_ent p (z - sum p z),   p = exp(z - lse)
          then chained through the transform: inv_temp * (1 - (z / cap)^2)
    d hidden = dz @ W,  d W = dz.T @ hidden,  d b = sum_rows dz

Forward (``_logprobs_fwd_kernel``): grid (row tiles, vocabulary splits).  Each program walks its
vocabulary range in ``BLOCK_V`` tiles, builds each logits tile with a D-loop of ``tl.dot``, and
keeps an online max / sum-exp / target logit / ``sum e^{z-m} z`` per row.  Splits (more programs
when rows are few) write partial statistics ``[4, splits, N]`` that the launcher merges (O(N)).
    FLOPs 2NDV; HBM bytes ~ N*D*e (hidden) + ceil(N / BLOCK_N) * V*D*e (head, mostly L2 hits)
    + O(N) outputs.  Nothing of size V survives the tile.

Backward: design and why.  A fully fused backward (logits tile -> dz tile -> both GEMMs in the
same program, as in FlashAttention's backward) needs per-program accumulators of d hidden
``[BLOCK_N x D]`` and d W ``[BLOCK_V x D]``; with D = 4096 they fit in neither registers nor SMEM,
so they would be read-modified-written (or atomically added) once per tile: about
``4 N V D (1/BLOCK_N + 1/BLOCK_V)`` bytes, ~540 GB for N=16384, V=128256, D=4096 - several
times the 69 ms the three GEMMs take at 790 TFLOP/s.  Instead:
  1. ``_logprobs_bwd_dz_kernel`` recomputes logits tiles from the saved ``lse`` (a GEMM with a
     fused epilogue, grouped ordering), forms ``dz`` in fp32 and stores it, rounded to the input
     dtype, into a bounded workspace ``[N x Vc]`` covering one vocabulary chunk; per-row-tile
     column sums of the fp32 ``dz`` give d bias without atomics.
  2. Two library GEMMs per chunk: ``d W[chunk] = dz.T @ hidden`` (complete - the reduction over
     all N rows happens inside one GEMM, fp32 accumulation, one rounding), and
     ``d hidden (+)= dz @ W[chunk]`` (fp32 accumulator ``N x D`` when there are several chunks,
     the gradient's own shape; a single chunk writes the input dtype directly).
  Deterministic (no atomics), one recompute (8NDV in all with the forward, as the torch backend),
  and the extra HBM traffic is dz written once and read twice: ``6 N V`` bytes in bf16
  (~12.6 GB, ~4 ms on an H100) - small next to the compute.  Memory: the workspace is bounded by
  ``fastpref.get_workspace_bytes()`` (the chunk width shrinks as N grows), plus O(N) statistics.
  The logits themselves still live only in registers.

dtypes: fp32 statistics and outputs; 16-bit operands go to tensor cores with fp32 accumulation
(the interpreter casts them to fp32 first: its bf16 ``tl.dot`` is wrong); fp32 operands use
``input_precision="ieee"`` (no TF32).  float64 inputs are not handled here (the backend routes
them to the torch backend).  Ignored rows give 0 and a zero gradient; a label outside [0, V)
never indexes memory (it just never matches a column) and gives NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import contract as C
from ..backends.tiling import GradAccumulator, plan_chunk_columns
from ._tiles import _grouped_pid, _logits_tile, dot_flags, num_vocab_splits, tile_config

# --------------------------------------------------------------------------- kernels


@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, labels_ptr,
    part_ptr,                        # [4, SPLITS, N] fp32: max, sum exp, target logit, sum e^{z-m} (z-m)
    # sizes
    N, V, D, SPLITS, TILES_PER_SPLIT,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd,
    # scalars
    inv_temp, softcap,
    # constexprs
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    v_start = pid_s * TILES_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(V, v_start + TILES_PER_SPLIT * BLOCK_V)

    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
            inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PRECISION,
        )
        hit = (cols[None, :] == labels[:, None]) & col_mask[None, :]
        zy_i += tl.sum(tl.where(hit, z, 0.0), axis=1)
        z_m = tl.where(col_mask[None, :], z, float("-inf"))  # columns past the range count for nothing
        m_new = tl.maximum(m_i, tl.max(z_m, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(z_m - m_new[:, None])
        s_prev = s_i
        s_i = s_i * alpha + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            # t = sum e^{z-m} (z-m), relative to the running max so that the entropy
            # log(s) - t/s never subtracts two large numbers; moving the max from m to m_new
            # turns t into alpha * (t + (m - m_new) * s).
            shift = tl.where(s_prev > 0, m_i - m_new, 0.0)
            zc = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            t_i = alpha * (t_i + shift * s_prev) + tl.sum(e * zc, axis=1)
        m_i = m_new

    out = part_ptr + pid_s * N + rows
    plane = SPLITS * N
    tl.store(out, m_i, mask=row_mask)
    tl.store(out + plane, s_i, mask=row_mask)
    tl.store(out + 2 * plane, zy_i, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(out + 3 * plane, t_i, mask=row_mask)


@triton.jit
def _logprobs_bwd_dz_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, labels_ptr,
    lse_ptr, g_ptr,                  # [N] fp32: saved lse; upstream d logp (0 ignored, NaN bad label)
    ge_ptr, mz_ptr,                  # [N] fp32: upstream d entropy (0 ignored), sum p z (if WITH_ENTROPY)
    dz_ptr,                          # [N, Vc] workspace, input dtype
    dbias_ptr,                       # [num row tiles, Vc] fp32 column sums of dz (if NEED_BIAS)
    # sizes
    N, V, D, V0, VC,                 # this chunk holds vocabulary columns [V0, V0 + VC)
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn, stride_dbn,
    # scalars
    inv_temp, softcap,
    # constexprs
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, NEED_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n, pid_v = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = V0 + local
    row_mask = rows < N
    col_mask = local < VC
    z = _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
        inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PRECISION,
    )
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
    if HAS_SOFTCAP:
        zc = z / softcap
        dz = dz * (1.0 - zc * zc)
    dz = dz * inv_temp
    mask = row_mask[:, None] & col_mask[None, :]
    dz = tl.where(mask, dz, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dzn + local[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_BIAS:
        tl.store(dbias_ptr + pid_n * stride_dbn + local, tl.sum(dz, axis=0), mask=col_mask)


# --------------------------------------------------------------------------- launchers


def logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                 opts: C.LogprobsOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's forward: ``(stats [LP_PLANES, N], empty cache)``, fp32.

    Computes the max / sum-exp / target / entropy planes (the extra statistics are not implemented
    in this kernel yet: ``fastpref.backends.triton_ops.unsupported`` routes such calls elsewhere).
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cache = hidden.new_empty(0, dtype=torch.float32)
    if n == 0:
        return C.empty_logprobs_stats(0, cache), cache
    inv_temp, cap = opts.transform.kernel_params()
    local = labels - opts.vocab_start if opts.vocab_start else labels
    cfg = tile_config("logprobs_fwd", dev, (d,))
    dot_f32, precision = dot_flags(hidden.dtype, dev)
    n_row_tiles = triton.cdiv(n, cfg.block_n)
    splits, per = num_vocab_splits(n_row_tiles, triton.cdiv(vocab, cfg.block_v), dev)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=dev)
    if not opts.entropy:
        part[3].zero_()  # the kernel writes the entropy plane only when asked
    _logprobs_fwd_kernel[(n_row_tiles, splits)](
        hidden, weight, bias if bias is not None else hidden, local,
        part,
        n, vocab, d, splits, per,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        inv_temp, 1.0 if cap is None else cap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=cap is not None, WITH_ENTROPY=opts.entropy,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        DOT_F32=dot_f32, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    parts = C.empty_logprobs_stats(n, part).unsqueeze(0).repeat(splits, 1, 1)
    parts[:, [C.LP_MAX, C.LP_SUM, C.LP_TARGET, C.LP_ENT]] = part.transpose(0, 1)
    return C.merge_logprobs(parts), cache


def logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, opts: C.LogprobsOptions,
                 need_hidden: bool, need_weight: bool, need_bias: bool):
    """The contract's backward: ``(d_hidden | None, d_weight | None, d_bias | None)`` in the inputs' dtypes."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = tile_config("logprobs_bwd", dev, (d,))
    chunk = plan_chunk_columns(n, vocab, elem_bytes=hidden.element_size(), multiple=cfg.block_v)
    need_bias = need_bias and bias is not None
    acc = GradAccumulator(hidden, weight, bias, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias, chunks=triton.cdiv(vocab, chunk), rows=n, cols=chunk)
    if n == 0 or not acc.any:
        return acc.result(bias)
    inv_temp, cap = opts.transform.kernel_params()
    local = labels - opts.vocab_start if opts.vocab_start else labels
    zero = torch.zeros(n, dtype=torch.float32, device=dev)
    g = g_logp.float()
    with_entropy = g_entropy is not None and entropy is not None
    if with_entropy:
        ge, mean_z = g_entropy.float(), lse - entropy.float()
    else:
        ge = mean_z = zero
    dot_f32, precision = dot_flags(hidden.dtype, dev)
    n_row_tiles = triton.cdiv(n, cfg.block_n)
    dz = torch.empty(n, chunk, dtype=hidden.dtype, device=dev)
    db_part = torch.empty(n_row_tiles, chunk, dtype=torch.float32, device=dev) if need_bias else zero
    for v0 in range(0, vocab, chunk):
        width = min(chunk, vocab - v0)
        grid = (n_row_tiles * triton.cdiv(width, cfg.block_v),)
        _logprobs_bwd_dz_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, local,
            lse, g, ge, mean_z,
            dz, db_part,
            n, vocab, d, v0, width,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            db_part.stride(0) if need_bias else 0,
            inv_temp, 1.0 if cap is None else cap,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=cap is not None, WITH_ENTROPY=with_entropy,
            NEED_BIAS=need_bias,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            DOT_F32=dot_f32, PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        acc.begin_chunk(v0, v0 + width)
        acc.add(dz[:, :width], hidden, weight[v0:v0 + width], 0, n, v0, v0 + width,
                bias_sums=db_part[:, :width].sum(0) if need_bias else None)
        acc.end_chunk(v0, v0 + width)
    return acc.result(bias)
