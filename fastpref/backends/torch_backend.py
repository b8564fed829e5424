"""Chunked pure-PyTorch backend: runs anywhere (CPU included), never holds more logits than the
workspace budget allows.  It is also the numerical specification the kernels follow.

Forward walks ``[R x C]`` tiles of the logits (R rows, C vocabulary columns) and keeps only the
per-row statistics of :mod:`.contract` (online max / sum-exp, the target logit, and on request the
entropy, ``sum p^2``, ``sum z`` and the max before the label).  The forward keeps the vocabulary
chunks of logits that fit the budget beside its scratch tiles (all of them when they fit,
:func:`_plan`); the backward reads those and recomputes the others from the saved ``lse``, forms
``dz`` and feeds two GEMMs through :class:`.tiling.GradAccumulator`.

Compute: ``2NDV`` FLOPs forward, ``4NDV`` backward plus ``2NDV`` for the share recomputed.
Memory: the workspace budget (scratch tiles and kept logits together) plus ``O(N)`` per-row floats.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from .. import _config
from . import contract as C
from .tiling import GradAccumulator, plan_tiles, ranges


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _elem_bytes(t: torch.Tensor) -> int:
    return 8 if t.dtype == torch.float64 else 4


def _tile_logits(h, w, b, inv_temp: float, cap: Optional[float], cdt: torch.dtype, out=None) -> torch.Tensor:
    """Logits of one tile in ``cdt``: ``cap * tanh(u * inv_temp / cap)`` (or ``u * inv_temp``),
    ``u = h @ w.T + b`` (see :meth:`.contract.Transform.kernel_params`)."""
    if h.device.type == "cuda" and h.dtype in (torch.float16, torch.bfloat16):
        z = (h @ w.T).to(cdt)  # tensor cores with fp32 accumulation, rounded once
        if out is not None:
            out.copy_(z)
            z = out
    elif out is not None:
        z = torch.mm(h.to(cdt), w.to(cdt).T, out=out)
    else:
        z = h.to(cdt) @ w.to(cdt).T
    if b is not None:
        z += b.to(cdt)
    if cap is not None:
        z *= inv_temp / cap
        z.tanh_()
        z *= cap
    elif inv_temp != 1.0:
        z *= inv_temp
    return z


def _rowdot_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two ``[r x c]`` tiles, overwriting ``y`` with the product
    (``linalg.vecdot`` allocates it on every call; a batched GEMV instead sums sequentially, too
    inexact for the entropy at a 100k vocabulary)."""
    return y.mul_(x).sum(1)


def _chain(dz: torch.Tensor, z: torch.Tensor, inv_temp: float, cap: Optional[float],
           work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In place: ``dz <- dz * dz/du`` for ``z = cap * tanh(u * inv_temp / cap)`` (``work``: a scratch
    tile of ``z``'s shape)."""
    if cap is not None:
        t = torch.div(z, cap, out=work) if work is not None else z / cap
        dz *= t.square_().neg_().add_(1.0)
    if inv_temp != 1.0:
        dz *= inv_temp
    return dz


def _local_index(labels: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels - start)`` clamped into ``[0, width)`` and whether it was inside (never out of bounds)."""
    idx = labels - start
    inside = (idx >= 0) & (idx < width)
    return idx.clamp(0, max(width - 1, 0)), inside


class _Heads:
    """A head and its rows: hidden, weight, bias, kernel parameters."""

    def __init__(self, hidden, weight, bias, transform: C.Transform):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.inv_temp, self.cap = transform.kernel_params()

    def tile(self, r0, r1, c0, c1, cdt, out=None):
        b = None if self.bias is None else self.bias[c0:c1]
        return _tile_logits(self.hidden[r0:r1], self.weight[c0:c1], b, self.inv_temp, self.cap, cdt, out)


class _Scratch:
    """Reused ``[rows x cols]`` tiles (fresh large allocations cost page faults on every tile on CPU)."""

    def __init__(self, rows: int, cols: int, like: torch.Tensor, dtype: torch.dtype):
        self.size, self.like, self.dtype, self.bufs = rows * cols, like, dtype, {}

    def __call__(self, slot: int, r: int, c: int) -> torch.Tensor:
        if slot not in self.bufs:
            self.bufs[slot] = self.like.new_empty(self.size, dtype=self.dtype)
        return self.bufs[slot][: r * c].view(r, c)


# Scratch tiles an op holds at once (the slots of its _Scratch): they and the kept logits share the budget.
_LP_SLOTS = 3  # a recomputed tile, its shifted copy, the entropy's exponentials / the backward's dz, factor
_DV_SLOTS = 7  # both heads' tiles and five temporaries (the JSD's second pass)


def _plan(n: int, vocab: int, elem: int, *, heads: int, slots: int, cache: bool, acc_dim: int = 0):
    """``(rows, cols, kept)``: the tile shape, and how many whole vocabulary chunks (all rows, every
    head) the forward keeps for the backward.

    Tiles are sized so that the ``slots`` scratch tiles take at most half the budget; the chunks kept
    take what the tiles leave.  So the tiles and the cache together stay within the budget, and when
    the whole logits do not fit the backward recomputes only the chunks not kept.
    """
    rows, cols = plan_tiles(n, vocab, elem_bytes=elem, heads=-(-slots // 2), acc_dim=acc_dim)
    if not (cache and rows == n and n and vocab and _config.get_keep_logits()):
        return rows, cols, 0
    free = _config.get_workspace_bytes() - slots * rows * cols * elem
    return rows, cols, min(-(-vocab // cols), max(free, 0) // (heads * n * cols * elem))


def _cache_shape(n: int, vocab: int, dtype: torch.dtype, *, heads: int, slots: int, cache: bool):
    rows, cols, kept = _plan(n, vocab, 8 if dtype == torch.float64 else 4, heads=heads, slots=slots, cache=cache)
    return (heads, kept, n, cols) if kept else (0,)


# --------------------------------------------------------------------------- logprobs


def logprobs_cache_shape(n: int, vocab: int, dtype: torch.dtype, opts: C.LogprobsOptions) -> tuple[int, ...]:
    return _cache_shape(n, vocab, dtype, heads=1, slots=_LP_SLOTS, cache=opts.cache)


def logprobs_fwd(hidden, weight, labels, bias, opts: C.LogprobsOptions):
    """-> ``(stats [LP_PLANES, N], cache)`` over the vocabulary slice ``weight`` holds."""
    n, vocab, cdt = hidden.shape[0], weight.shape[0], _compute_dtype(hidden)
    elem = _elem_bytes(hidden)
    head = _Heads(hidden, weight, bias, opts.transform)
    rows, cols, kept = _plan(n, vocab, elem, heads=1, slots=_LP_SLOTS, cache=opts.cache)
    cache = hidden.new_empty(logprobs_cache_shape(n, vocab, hidden.dtype, opts), dtype=cdt)
    stats = C.empty_logprobs_stats(n, hidden.new_empty(0, dtype=cdt))
    scratch = _Scratch(rows, cols, hidden, cdt)
    for r0, r1 in ranges(n, rows):
        st = stats[:, r0:r1]
        for k, (c0, c1) in enumerate(ranges(vocab, cols)):
            keep = k < kept  # the first chunks stay for the backward, the rest is recomputed there
            out = cache[0, k, :, : c1 - c0] if keep else scratch(0, r1 - r0, c1 - c0)
            z = head.tile(r0, r1, c0, c1, cdt, out)
            _fold_logprobs_tile(st, z, labels[r0:r1] - (opts.vocab_start + c0), opts, scratch, in_place=not keep)
    return stats, cache


def _fold_logprobs_tile(st: torch.Tensor, z: torch.Tensor, local: torch.Tensor, opts, scratch: _Scratch, *,
                        in_place: bool) -> None:
    """Fold one logits tile into the running statistics ``st [LP_PLANES, r]`` (``local``: labels
    relative to the tile's first column); ``z`` may be overwritten when ``in_place``."""
    width = z.shape[1]
    idx, inside = _local_index(local, 0, width)
    got = z.gather(1, idx.unsqueeze(1)).squeeze(1)
    st[C.LP_TARGET] += torch.where(inside, got, torch.zeros_like(got))
    if opts.mean_logits:
        st[C.LP_ZSUM] += z.sum(1)
    if opts.is_top1:
        before = torch.arange(width, device=z.device) < local.unsqueeze(1)
        st[C.LP_BEFORE] = torch.maximum(st[C.LP_BEFORE], z.masked_fill(~before, float("-inf")).amax(1))
    m, s = st[C.LP_MAX], st[C.LP_SUM]
    m_new = torch.maximum(m, z.amax(1))
    rescale = torch.exp(m - m_new)
    r, c = z.shape
    zc = z.sub_(m_new.unsqueeze(1)) if in_place else torch.sub(z, m_new.unsqueeze(1), out=scratch(1, r, c))  # <= 0
    if opts.entropy:
        # t = sum e^{z-m} (z-m) relative to the running max, so the entropy log(s) - t/s never
        # subtracts two large numbers; moving the max from m to m_new turns t into
        # rescale * (t + (m - m_new) s).
        shift = torch.where(s > 0, m - m_new, torch.zeros_like(m))
        e = torch.exp(zc, out=scratch(2, r, c))
        st[C.LP_ENT] = rescale * (st[C.LP_ENT] + shift * s) + _rowdot_(e, zc)
    else:
        e = zc.exp_()
    st[C.LP_SUM] = s * rescale + e.sum(1)
    if opts.log_sum_sq_probs:
        st[C.LP_SQ] = st[C.LP_SQ] * rescale.square() + _rowdot_(e, e)
    st[C.LP_MAX] = m_new


def logprobs_bwd(g_logp, g_entropy, hidden, weight, labels, bias, lse, entropy, cache, opts: C.LogprobsOptions,
                 need_hidden: bool, need_weight: bool, need_bias: bool):
    """``dz = g (onehot - p) - g_ent p (log p + H)``, chained through the transform, then two GEMMs."""
    n, vocab, dim, cdt = hidden.shape[0], weight.shape[0], hidden.shape[1], _compute_dtype(hidden)
    low_w = weight.dtype != cdt
    kept = cache.shape[1] if cache.numel() else 0  # chunks the forward kept (all rows, ``cols`` wide)
    rows, cols = (n, cache.shape[3]) if kept else _plan(n, vocab, _elem_bytes(hidden), heads=1, slots=_LP_SLOTS,
                                                        cache=False, acc_dim=dim if (low_w and need_weight) else 0)[:2]
    acc = GradAccumulator(hidden, weight, bias, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias and bias is not None, chunks=-(-vocab // cols), rows=rows, cols=cols)
    if not acc.any:
        return acc.result(bias)
    head = _Heads(hidden, weight, bias, opts.transform)
    g = g_logp.to(cdt)
    with_entropy = g_entropy is not None and entropy is not None
    if with_entropy:
        ge, ent = g_entropy.to(cdt), entropy.to(cdt)
    lse = lse.to(cdt)
    scratch = _Scratch(rows, cols, hidden, cdt)
    for k, (c0, c1) in enumerate(ranges(vocab, cols)):
        w = weight[c0:c1]
        acc.begin_chunk(c0, c1)
        for r0, r1 in ranges(n, rows):
            r, c = r1 - r0, c1 - c0
            z = cache[0, k, :, :c] if k < kept else head.tile(r0, r1, c0, c1, cdt, scratch(0, r, c))
            # dz = g (onehot - p) - ge p (log p + H) = -p (g + ge (log p + H)) + g onehot
            dz = torch.sub(z, lse[r0:r1].unsqueeze(1), out=scratch(1, r, c))  # log p
            gr = g[r0:r1].unsqueeze(1)
            if with_entropy:
                factor = torch.add(dz, ent[r0:r1].unsqueeze(1), out=scratch(2, r, c))
                factor.mul_(ge[r0:r1].unsqueeze(1)).add_(gr)
                dz.exp_().mul_(factor).neg_()
            else:
                dz.exp_().mul_(-gr)
            idx, inside = _local_index(labels[r0:r1], opts.vocab_start + c0, c)
            hit = torch.where(inside, g[r0:r1], torch.zeros_like(g[r0:r1]))
            dz.scatter_add_(1, idx.unsqueeze(1), hit.unsqueeze(1))
            _chain(dz, z, head.inv_temp, head.cap, scratch(2, r, c))
            acc.add(dz, hidden[r0:r1], w, r0, r1, c0, c1)
        acc.end_chunk(c0, c1)
    return acc.result(bias)


# --------------------------------------------------------------------------- divergence


def _log_mixture(pt: torch.Tensor, ps: torch.Tensor, beta: float, out: torch.Tensor) -> torch.Tensor:
    """``log(beta pt + (1 - beta) ps)`` into ``out`` (may be ``pt``) from the probabilities: one ``log``
    per element instead of a ``logaddexp``.  Where both underflow the mixture is clamped to the
    smallest normal number: every term it enters is then multiplied by a probability below it."""
    tiny = torch.finfo(pt.dtype).tiny
    return torch.mul(pt, beta, out=out).add_(ps, alpha=1.0 - beta).clamp_min_(tiny).log_()


def divergence_cache_shape(n: int, vocab: int, dtype: torch.dtype, opts: C.DivergenceOptions) -> tuple[int, ...]:
    return _cache_shape(n, vocab, dtype, heads=2, slots=_DV_SLOTS, cache=opts.cache)


def divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, lse_st, opts: C.DivergenceOptions):
    """-> ``(stats [DV_PLANES, N], cache)``.

    Without ``lse_st``: one pass of online max / sum-exp for both heads with the one rescaled cross
    term forward / reverse KL need and the student entropy; a JSD over the whole vocabulary then
    takes a second pass (from the cache, or recomputed) for its two KL planes.  With ``lse_st``
    (a sharded JSD, merged across shards): the KL pass only.
    """
    n, vocab, cdt = s_hidden.shape[0], s_weight.shape[0], _compute_dtype(s_hidden)
    elem = _elem_bytes(s_hidden)
    s = _Heads(s_hidden, s_weight, s_bias, opts.student)
    t = _Heads(t_hidden, t_weight, t_bias, opts.teacher)
    rows, cols, kept = _plan(n, vocab, elem, heads=2, slots=_DV_SLOTS, cache=opts.cache and lse_st is None)
    cache = s_hidden.new_empty(divergence_cache_shape(n, vocab, s_hidden.dtype, opts) if kept else (0,),
                               dtype=cdt)
    stats = C.empty_divergence_stats(n, s_hidden.new_empty(0, dtype=cdt))
    scratch = _Scratch(rows, cols, s_hidden, cdt)

    def tiles(r0, r1, c0, c1, k, fill):
        """Chunk ``k``'s two tiles: read from the cache, or computed (into the cache when it keeps them)."""
        if k < kept and not fill:
            return cache[0, k, :, : c1 - c0], cache[1, k, :, : c1 - c0]
        r, c = r1 - r0, c1 - c0
        outs = (cache[0, k, :, :c], cache[1, k, :, :c]) if k < kept else (scratch(0, r, c), scratch(1, r, c))
        return s.tile(r0, r1, c0, c1, cdt, outs[0]), t.tile(r0, r1, c0, c1, cdt, outs[1])

    jsd_here = opts.kind == C.Kind.JSD and (lse_st is not None or C.covers_vocabulary(opts, vocab))
    for r0, r1 in ranges(n, rows):
        st = stats[:, r0:r1]
        if lse_st is None:
            for k, (c0, c1) in enumerate(ranges(vocab, cols)):
                zs, zt = tiles(r0, r1, c0, c1, k, fill=True)
                _fold_divergence_tile(st, zs, zt, opts, scratch, in_place=k >= kept)
        if jsd_here:
            lse = C.divergence_lse(st) if lse_st is None else lse_st[r0:r1].to(cdt)
            for k, (c0, c1) in enumerate(ranges(vocab, cols)):
                zs, zt = tiles(r0, r1, c0, c1, k, fill=False)
                r, c = zs.shape
                log_ps = torch.sub(zs, lse[:, :1], out=scratch(2, r, c))
                log_pt = torch.sub(zt, lse[:, 1:], out=scratch(3, r, c))
                ps, pt = torch.exp(log_ps, out=scratch(4, r, c)), torch.exp(log_pt, out=scratch(5, r, c))
                log_m = _log_mixture(pt, ps, opts.beta, out=scratch(6, r, c))
                st[C.DV_KLT] += _rowdot_(pt, log_pt.sub_(log_m))
                st[C.DV_KLS] += _rowdot_(ps, log_ps.sub_(log_m))
    return stats, cache


def _fold_divergence_tile(st: torch.Tensor, zs: torch.Tensor, zt: torch.Tensor, opts, scratch: _Scratch, *,
                          in_place: bool) -> None:
    """Fold one pair of logits tiles into ``st [DV_PLANES, r]``; ``zs``/``zt`` may be overwritten
    when ``in_place``."""
    r, c = zs.shape
    ms, mt, ss = st[C.DV_SMAX], st[C.DV_TMAX], st[C.DV_SSUM]
    ms_new, mt_new = torch.maximum(ms, zs.amax(1)), torch.maximum(mt, zt.amax(1))
    rs, rt = torch.exp(ms - ms_new), torch.exp(mt - mt_new)
    if opts.kind == C.Kind.FORWARD_KL:  # sum_j e^{zt_j - mt} (zt_j - zs_j)
        diff = torch.sub(zt, zs, out=scratch(2, r, c))
    elif opts.kind == C.Kind.REVERSE_KL:  # sum_j e^{zs_j - ms} (zs_j - zt_j)
        diff = torch.sub(zs, zt, out=scratch(2, r, c))
    zsc = zs.sub_(ms_new.unsqueeze(1)) if in_place else torch.sub(zs, ms_new.unsqueeze(1), out=scratch(3, r, c))
    es = torch.exp(zsc, out=scratch(4, r, c)) if opts.entropy else zsc.exp_()
    et = zt.sub_(mt_new.unsqueeze(1)) if in_place else torch.sub(zt, mt_new.unsqueeze(1), out=scratch(5, r, c))
    et.exp_()
    if opts.kind == C.Kind.FORWARD_KL:
        st[C.DV_CROSS] = st[C.DV_CROSS] * rt + _rowdot_(et, diff)
    elif opts.kind == C.Kind.REVERSE_KL:
        st[C.DV_CROSS] = st[C.DV_CROSS] * rs + _rowdot_(es, diff)
    if opts.entropy:
        shift = torch.where(ss > 0, ms - ms_new, torch.zeros_like(ms))
        st[C.DV_SENT] = rs * (st[C.DV_SENT] + shift * ss) + _rowdot_(es, zsc)
    st[C.DV_SSUM] = ss * rs + es.sum(1)
    st[C.DV_TSUM] = st[C.DV_TSUM] * rt + et.sum(1)
    st[C.DV_SMAX], st[C.DV_TMAX] = ms_new, mt_new


def divergence_bwd(grad, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache,
                   opts: C.DivergenceOptions, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Student-side gradients; ``d div / d zs`` per kind:

    forward_kl ``ps - pt``;  reverse_kl ``ps (log ps - log pt - RKL)``;
    jsd ``(1 - beta) ps (log ps - log m - KL(ps || m))``.
    """
    n, vocab, dim, cdt = s_hidden.shape[0], s_weight.shape[0], s_hidden.shape[1], _compute_dtype(s_hidden)
    low_w = s_weight.dtype != cdt
    kept = cache.shape[1] if cache.numel() else 0
    rows, cols = (n, cache.shape[3]) if kept else _plan(n, vocab, _elem_bytes(s_hidden), heads=2, slots=_DV_SLOTS,
                                                        cache=False, acc_dim=dim if (low_w and need_weight) else 0)[:2]
    acc = GradAccumulator(s_hidden, s_weight, s_bias, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias and s_bias is not None, chunks=-(-vocab // cols), rows=rows,
                          cols=cols)
    if not acc.any:
        return acc.result(s_bias)
    s = _Heads(s_hidden, s_weight, s_bias, opts.student)
    t = _Heads(t_hidden, t_weight, t_bias, opts.teacher)
    g = grad.to(cdt)
    saved = saved.to(cdt)
    lse_s, lse_t, aux = saved[:, 0], saved[:, 1], saved[:, 2]
    scratch = _Scratch(rows, cols, s_hidden, cdt)
    for k, (c0, c1) in enumerate(ranges(vocab, cols)):
        w = s_weight[c0:c1]
        acc.begin_chunk(c0, c1)
        for r0, r1 in ranges(n, rows):
            r, c = r1 - r0, c1 - c0
            if k < kept:
                zs, zt = cache[0, k, :, :c], cache[1, k, :, :c]
            else:
                zs, zt = s.tile(r0, r1, c0, c1, cdt, scratch(0, r, c)), t.tile(r0, r1, c0, c1, cdt, scratch(1, r, c))
            dz = torch.sub(zs, lse_s[r0:r1].unsqueeze(1), out=scratch(2, r, c))  # log ps
            other = torch.sub(zt, lse_t[r0:r1].unsqueeze(1), out=scratch(3, r, c))  # log pt
            gr = g[r0:r1].unsqueeze(1)
            if opts.kind == C.Kind.FORWARD_KL:
                dz.exp_().sub_(other.exp_()).mul_(gr)
            else:
                ps = torch.exp(dz, out=scratch(4, r, c))
                if opts.kind == C.Kind.JSD:  # log pt -> log m
                    other = _log_mixture(other.exp_(), ps, opts.beta, out=other)
                    gr = gr * (1.0 - opts.beta)
                dz.sub_(other).sub_(aux[r0:r1].unsqueeze(1)).mul_(ps).mul_(gr)
            _chain(dz, zs, s.inv_temp, s.cap, scratch(3, r, c))
            acc.add(dz, s_hidden[r0:r1], w, r0, r1, c0, c1)
        acc.end_chunk(c0, c1)
    return acc.result(s_bias)


# --------------------------------------------------------------------------- capabilities


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None  # runs wherever PyTorch runs


def unsupported(op: str, opts, sharded: bool) -> Optional[str]:
    return None  # the reference implementation of the whole contract


IMPL = SimpleNamespace(
    logprobs_fwd=logprobs_fwd, logprobs_bwd=logprobs_bwd, divergence_fwd=divergence_fwd,
    divergence_bwd=divergence_bwd, logprobs_cache_shape=logprobs_cache_shape,
    divergence_cache_shape=divergence_cache_shape,
)
