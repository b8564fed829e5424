"""Chunked pure-PyTorch backend: runs anywhere (CPU included), never holds the full logits.

Forward walks ``[R x C]`` tiles of the logits (R rows, C vocabulary entries) and keeps
only per-row statistics: an online max/sum for the log-sum-exp, the target logit, and
(on request) ``sum exp(z) * z`` for the entropy.  Backward recomputes every tile from
those statistics, forms ``dz`` in place and feeds two GEMMs.

Memory: at most a few tiles of ``R*C`` fp32 (``R*C <= workspace/16`` bytes) plus ``O(N)``
per-row floats; the weight-gradient accumulator of a low-precision head is one
``[C x D]`` fp32 tile.  Compute: ``2NDV`` FLOPs forward, ``6NDV`` backward (recompute +
two GEMMs), so forward+backward costs 8NDV against the 6NDV of a materialising version.

Tiles span all rows when they fit (vocabulary tiles of at least 2048 columns otherwise), and the
backward loops vocabulary-outer, rows-inner, so each ``d weight`` slice comes from one GEMM over
all rows and is written once; ``d hidden`` accumulates in fp32 (``N x D``, the gradient's shape).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _config

# Divergence kinds, as ints so they can travel through torch.library schemas.
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2

_MIN_TILE_COLS = 2048


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _plan(n_rows: int, vocab: int, dim: int, low_precision_weight: bool) -> tuple[int, int]:
    """Tile shape (R, C): all rows when they fit beside a vocabulary tile of >= _MIN_TILE_COLS.

    Tall tiles make every GEMM efficient: the backward's ``d W[c] = dz.T @ h`` then runs once per
    vocabulary tile with K = N and writes its slice of ``d W`` once, instead of re-reading and
    re-writing the whole ``[V x D]`` gradient for every thin row chunk.
    """
    elems = max(_config.get_workspace_bytes() // 16, 1024)
    min_cols = min(vocab, _MIN_TILE_COLS)
    rows = max(1, min(n_rows, elems // min_cols))
    cols = max(1, min(vocab, elems // rows))
    if low_precision_weight:  # the fp32 d-weight accumulator is one [C x D] tile
        cols = min(cols, max(elems // max(dim, 1), 1))
    return rows, cols


def _tile_logits(
    h: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    temperature: float,
    softcap: Optional[float],
    cdt: torch.dtype,
) -> torch.Tensor:
    """fp32 (fp64 for fp64 inputs) logits of one tile: ``softcap(tanh)((h @ w.T + b) / T)``."""
    if h.device.type == "cuda" and h.dtype in (torch.float16, torch.bfloat16):
        z = (h @ w.T).to(cdt)  # tensor cores with fp32 accumulation, rounded once
    else:
        z = h.to(cdt) @ w.to(cdt).T
    if b is not None:
        z += b.to(cdt)
    if temperature != 1.0:
        z *= 1.0 / temperature
    if softcap is not None:
        z *= 1.0 / softcap
        z.tanh_()
        z *= softcap
    return z


def _chain(dz: torch.Tensor, z: torch.Tensor, temperature: float, softcap: Optional[float]) -> torch.Tensor:
    """In place: ``dz <- dz * dz/du / T`` for ``z = c * tanh(u / c)``, ``u = logits / T``."""
    if softcap is not None:
        dz *= 1.0 - (z / softcap).square()
    if temperature != 1.0:
        dz *= 1.0 / temperature
    return dz


def _gather_tile(z: torch.Tensor, labels: torch.Tensor, c0: int) -> torch.Tensor:
    """``z[i, labels[i] - c0]`` where that column is inside this tile, else 0 (never out of bounds)."""
    idx = labels - c0
    inside = (idx >= 0) & (idx < z.shape[1])
    got = z.gather(1, idx.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(inside, got, torch.zeros_like(got))


def _row_status(labels: torch.Tensor, ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = labels != ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    return keep, in_range


def _masked(values: torch.Tensor, keep: torch.Tensor, in_range: torch.Tensor) -> torch.Tensor:
    """0 on ignored rows, NaN on rows whose label is out of range (never a silent wrong value)."""
    nan = torch.full_like(values, float("nan"))
    return torch.where(keep, torch.where(in_range, values, nan), torch.zeros_like(values))


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
    """-> ``logp (N,)``, ``entropy (N,)`` (empty unless ``with_entropy``), ``lse (N,)``."""
    n, vocab, cdt = hidden.shape[0], weight.shape[0], _compute_dtype(hidden)
    rows, cols = _plan(n, vocab, hidden.shape[1], False)
    lse = torch.empty(n, dtype=cdt, device=hidden.device)
    target = torch.empty(n, dtype=cdt, device=hidden.device)
    ent = torch.empty(n, dtype=cdt, device=hidden.device) if with_entropy else None
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        h, lab = hidden[r0:r1], labels[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), dtype=cdt, device=hidden.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m) if with_entropy else None
        zy = torch.zeros_like(m)
        for c0 in range(0, vocab, cols):
            c1 = min(c0 + cols, vocab)
            z = _tile_logits(h, weight[c0:c1], None if bias is None else bias[c0:c1], temperature, softcap, cdt)
            zy += _gather_tile(z, lab, c0)
            m_new = torch.maximum(m, z.amax(1))
            rescale = torch.exp(m - m_new)
            z.sub_(m_new.unsqueeze(1))  # z - m_new <= 0
            if with_entropy:
                # t = sum e^{z-m} (z-m), kept relative to the running max so that the entropy
                # log(s) - t/s never subtracts two large numbers; moving the max from m to
                # m_new turns t into rescale * (t + (m - m_new) * s).
                shift = torch.where(s > 0, m - m_new, torch.zeros_like(m))
                e = torch.exp(z)
                t = rescale * (t + shift * s) + torch.linalg.vecdot(e, z)
            else:
                e = z.exp_()
            s = s * rescale + e.sum(1)
            m = m_new
        lse[r0:r1] = m + torch.log(s)
        target[r0:r1] = zy
        if with_entropy:
            ent[r0:r1] = torch.log(s) - t / s
    keep, in_range = _row_status(labels, ignore_index, vocab)
    logp = _masked(target - lse, keep, in_range)
    if with_entropy:
        entropy = _masked(ent, keep, in_range)
    else:
        entropy = logp.new_empty(0)
    return logp, entropy, lse


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
    """``dz = g_logp (onehot - p) - g_ent p (z - sum p z)``, chained, then ``dz @ W`` and ``dz.T @ h``."""
    n, vocab, dim, cdt = hidden.shape[0], weight.shape[0], hidden.shape[1], _compute_dtype(hidden)
    low_w = weight.dtype not in (torch.float32, torch.float64)
    rows, cols = _plan(n, vocab, dim, low_w and need_weight)
    keep, in_range = _row_status(labels, ignore_index, vocab)
    nan = torch.full_like(lse, float("nan"))
    zero = torch.zeros_like(lse)
    g_logp = torch.where(keep, torch.where(in_range, grad_logp.to(cdt), nan), zero)
    with_entropy = grad_entropy is not None and entropy is not None
    if with_entropy:
        g_ent = torch.where(keep, grad_entropy.to(cdt), zero)
        ent = entropy.to(cdt)

    d_hidden = torch.zeros(n, dim, dtype=cdt, device=hidden.device) if need_hidden else None
    d_weight = torch.empty_like(weight) if need_weight else None
    d_bias = torch.empty(vocab, dtype=cdt, device=hidden.device) if need_bias else None
    for c0 in range(0, vocab, cols):
        c1 = min(c0 + cols, vocab)
        w = weight[c0:c1]
        w_c = w.to(cdt)
        if need_weight:
            dw = torch.zeros(c1 - c0, dim, dtype=cdt, device=hidden.device) if low_w else d_weight[c0:c1].zero_()
        if need_bias:
            d_bias[c0:c1] = 0
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            h = hidden[r0:r1]
            z = _tile_logits(h, w, None if bias is None else bias[c0:c1], temperature, softcap, cdt)
            g = g_logp[r0:r1].unsqueeze(1)
            log_p = z - lse[r0:r1].unsqueeze(1) if softcap is not None else z.sub_(lse[r0:r1].unsqueeze(1))
            if with_entropy:
                # -g p - ge p (z - sum p z) = -p * (g + ge * (log p + H))
                ge = g_ent[r0:r1].unsqueeze(1)
                factor = torch.addcmul(g, ge, log_p + ent[r0:r1].unsqueeze(1))
                dz = log_p.exp_() if softcap is None else log_p.exp()
                dz *= factor
                dz.neg_()
            else:
                dz = log_p.exp_()
                dz *= -g
            idx = labels[r0:r1] - c0
            inside = (idx >= 0) & (idx < c1 - c0)
            hit = torch.where(inside, g_logp[r0:r1], torch.zeros_like(g_logp[r0:r1]))
            dz.scatter_add_(1, idx.clamp(0, c1 - c0 - 1).unsqueeze(1), hit.unsqueeze(1))
            _chain(dz, z, temperature, softcap)
            if need_hidden:
                d_hidden[r0:r1].addmm_(dz, w_c)
            if need_weight:
                dw.addmm_(dz.T, h.to(cdt))
            if need_bias:
                d_bias[c0:c1] += dz.sum(0)
        if need_weight and low_w:
            d_weight[c0:c1] = dw
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        d_weight,
        None if d_bias is None else d_bias.to(bias.dtype),
    )


# --------------------------------------------------------------------------- divergence


def _log_mixture(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(beta * pt + (1 - beta) * ps)`` in log space (beta strictly inside (0, 1))."""
    return torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))


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
    """-> ``div (N,)`` and ``stats (N, 3)`` = (lse_student, lse_teacher, aux).

    aux is the row's reverse KL (kind reverse_kl) or ``KL(ps || m)`` (kind jsd): the
    backward needs it for the softmax chain rule.  Forward/reverse KL stream in one pass
    (online max/sum for both heads plus one rescaled cross term); JSD needs the two
    log-sum-exps first, so it takes a second pass when the vocabulary spans several tiles.
    """
    n, vocab, cdt = s_hidden.shape[0], s_weight.shape[0], _compute_dtype(s_hidden)
    rows, cols = _plan(n, vocab, max(s_hidden.shape[1], t_hidden.shape[1]), False)
    rows = max(1, rows // 2)  # two heads' tiles live together
    stats = torch.empty(n, 3, dtype=cdt, device=s_hidden.device)
    div = torch.empty(n, dtype=cdt, device=s_hidden.device)

    def tiles(r0, r1, c0, c1):
        zs = _tile_logits(
            s_hidden[r0:r1], s_weight[c0:c1], None if s_bias is None else s_bias[c0:c1], temperature,
            s_softcap, cdt,
        )
        zt = _tile_logits(
            t_hidden[r0:r1], t_weight[c0:c1], None if t_bias is None else t_bias[c0:c1], temperature,
            t_softcap, cdt,
        )
        return zs, zt

    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        ms = torch.full((r1 - r0,), float("-inf"), dtype=cdt, device=s_hidden.device)
        mt, ss, st, cross = ms.clone(), torch.zeros_like(ms), torch.zeros_like(ms), torch.zeros_like(ms)
        for c0 in range(0, vocab, cols):
            c1 = min(c0 + cols, vocab)
            zs, zt = tiles(r0, r1, c0, c1)
            ms_new, mt_new = torch.maximum(ms, zs.amax(1)), torch.maximum(mt, zt.amax(1))
            rs, rt = torch.exp(ms - ms_new), torch.exp(mt - mt_new)
            es, et = torch.exp(zs - ms_new.unsqueeze(1)), torch.exp(zt - mt_new.unsqueeze(1))
            if kind == FORWARD_KL:  # sum_j e^{zt_j - mt} (zt_j - zs_j)
                cross = cross * rt + torch.linalg.vecdot(et, zt - zs)
            elif kind == REVERSE_KL:  # sum_j e^{zs_j - ms} (zs_j - zt_j)
                cross = cross * rs + torch.linalg.vecdot(es, zs - zt)
            ss, st = ss * rs + es.sum(1), st * rt + et.sum(1)
            ms, mt = ms_new, mt_new
        lse_s, lse_t = ms + torch.log(ss), mt + torch.log(st)
        stats[r0:r1, 0], stats[r0:r1, 1] = lse_s, lse_t
        if kind == FORWARD_KL:
            div[r0:r1] = cross / st - lse_t + lse_s
            stats[r0:r1, 2] = 0
        elif kind == REVERSE_KL:
            div[r0:r1] = cross / ss - lse_s + lse_t
            stats[r0:r1, 2] = div[r0:r1]
        else:  # second pass: KL(pt || m) and KL(ps || m)
            kl_t, kl_s = torch.zeros_like(ms), torch.zeros_like(ms)
            for c0 in range(0, vocab, cols):
                c1 = min(c0 + cols, vocab)
                zs, zt = tiles(r0, r1, c0, c1)
                log_ps, log_pt = zs - lse_s.unsqueeze(1), zt - lse_t.unsqueeze(1)
                log_m = _log_mixture(log_ps, log_pt, beta)
                kl_t += torch.linalg.vecdot(log_pt.exp(), log_pt - log_m)
                kl_s += torch.linalg.vecdot(log_ps.exp(), log_ps - log_m)
            div[r0:r1] = beta * kl_t + (1.0 - beta) * kl_s
            stats[r0:r1, 2] = kl_s
    if labels is not None:
        keep = labels != ignore_index
        div = torch.where(keep, div, torch.zeros_like(div))
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
    """Student-side gradients; ``d div / d zs`` per kind:

    forward_kl: ``ps - pt``;  reverse_kl: ``ps (log ps - log pt - RKL)``;
    jsd: ``(1 - beta) ps (log ps - log m - KL(ps || m))``.
    """
    n, vocab, dim, cdt = s_hidden.shape[0], s_weight.shape[0], s_hidden.shape[1], _compute_dtype(s_hidden)
    low_w = s_weight.dtype not in (torch.float32, torch.float64)
    rows, cols = _plan(n, vocab, max(dim, t_hidden.shape[1]), low_w and need_weight)
    rows = max(1, rows // 2)
    g = grad.to(cdt)
    if labels is not None:
        g = torch.where(labels != ignore_index, g, torch.zeros_like(g))
    lse_s, lse_t, aux = stats[:, 0], stats[:, 1], stats[:, 2]

    d_hidden = torch.zeros(n, dim, dtype=cdt, device=s_hidden.device) if need_hidden else None
    d_weight = torch.empty_like(s_weight) if need_weight else None
    d_bias = torch.empty(vocab, dtype=cdt, device=s_hidden.device) if need_bias else None
    for c0 in range(0, vocab, cols):
        c1 = min(c0 + cols, vocab)
        w = s_weight[c0:c1]
        w_c = w.to(cdt)
        if need_weight:
            dw = torch.zeros(c1 - c0, dim, dtype=cdt, device=s_hidden.device) if low_w else d_weight[c0:c1].zero_()
        if need_bias:
            d_bias[c0:c1] = 0
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            zs = _tile_logits(
                s_hidden[r0:r1], w, None if s_bias is None else s_bias[c0:c1], temperature, s_softcap, cdt
            )
            zt = _tile_logits(
                t_hidden[r0:r1], t_weight[c0:c1], None if t_bias is None else t_bias[c0:c1], temperature,
                t_softcap, cdt,
            )
            log_ps = zs - lse_s[r0:r1].unsqueeze(1)
            log_pt = zt.sub_(lse_t[r0:r1].unsqueeze(1))
            gr = g[r0:r1].unsqueeze(1)
            if kind == FORWARD_KL:
                dz = log_ps.exp().sub_(log_pt.exp_())
                dz *= gr
            elif kind == REVERSE_KL:
                dz = log_ps.exp()
                dz *= (log_ps - log_pt).sub_(aux[r0:r1].unsqueeze(1))
                dz *= gr
            else:
                log_m = _log_mixture(log_ps, log_pt, beta)
                dz = log_ps.exp()
                dz *= (log_ps - log_m).sub_(aux[r0:r1].unsqueeze(1))
                dz *= gr * (1.0 - beta)
            _chain(dz, zs, temperature, s_softcap)
            if need_hidden:
                d_hidden[r0:r1].addmm_(dz, w_c)
            if need_weight:
                dw.addmm_(dz.T, s_hidden[r0:r1].to(cdt))
            if need_bias:
                d_bias[c0:c1] += dz.sum(0)
        if need_weight and low_w:
            d_weight[c0:c1] = dw
    return (
        None if d_hidden is None else d_hidden.to(s_hidden.dtype),
        d_weight,
        None if d_bias is None else d_bias.to(s_bias.dtype),
    )
