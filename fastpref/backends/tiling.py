"""Chunk planning and gradient accumulation, shared by every backend.

The workspace budget (``fastpref.get_workspace_bytes()``, ``FASTPREF_WORKSPACE_MB``) bounds what a
call holds beyond its inputs, outputs and O(N) row statistics:

* **tiles** — logits / ``dz`` tiles of ``rows x cols``; :func:`plan_tiles` picks tall tiles (all rows
  when they fit beside a wide enough vocabulary tile), so that ``d W[chunk] = dz.T @ h`` is one GEMM
  over all rows and each slice of ``d W`` is written once;
* **cache** — when the whole ``[N x V]`` logits of the call (both heads' for a divergence) fit in
  three quarters of the budget, the forward keeps them for the backward (:func:`plan_cache`), which
  then skips recomputing them: ``6NDV`` FLOPs instead of ``8NDV``.  The torch backend plans its own
  (``torch_backend._plan``): it also keeps as many whole vocabulary chunks as fit when the whole
  logits do not, ``(6 + 2 r) NDV`` with ``r`` the share of the vocabulary it recomputes.

docs/design.md has the cost model.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import _config

log = logging.getLogger("fastpref")

CACHE_FRACTION = 0.75
_TILE_SHARE = 4  # a tile may take a quarter of the budget: a few tiles and temporaries live together
_MIN_TILE_COLS = 2048


def plan_tiles(n_rows: int, vocab: int, *, elem_bytes: int = 4, heads: int = 1, acc_dim: int = 0,
               min_cols: Optional[int] = None, col_multiple: int = 1) -> tuple[int, int]:
    """Tile shape ``(rows, cols)``: all rows when they fit beside a tile of >= ``min_cols`` columns.

    ``heads`` tiles live together (two for a divergence); ``acc_dim`` > 0 reserves a ``[cols x
    acc_dim]`` fp32 ``d W`` accumulator per tile (16-bit heads); ``col_multiple`` rounds a split
    vocabulary tile down to a multiple (kernel block widths).
    """
    elems = max(_config.get_workspace_bytes() // (_TILE_SHARE * elem_bytes * heads), 1024)
    n_rows = max(n_rows, 1)
    rows = max(1, min(n_rows, elems // min(vocab, min_cols or _MIN_TILE_COLS)))
    cols = max(1, min(vocab, elems // rows))
    if acc_dim:
        cols = min(cols, max(elems // acc_dim, 1))
    if cols < vocab and col_multiple > 1:
        cols = max(col_multiple, cols // col_multiple * col_multiple)
    return rows, min(cols, vocab)


def plan_chunk_columns(n_rows: int, vocab: int, *, elem_bytes: int, multiple: int = 1) -> int:
    """Columns of an all-rows ``[N x cols]`` chunk (a kernel's ``dz`` workspace) within the budget: a
    multiple of ``multiple`` (at least one), at most the vocabulary."""
    cols = _config.get_workspace_bytes() // max(1, n_rows * elem_bytes)
    return min(max(multiple, cols // multiple * multiple), vocab)


def plan_cache(n_rows: int, vocab: int, *, elem_bytes: int = 4, heads: int = 1) -> int:
    """Columns per cached chunk when the whole logits of the call fit the budget, else 0.

    The cache is ``[chunks, N, cols]`` (the last chunk padded) so that every chunk is one contiguous
    ``[N x cols]`` GEMM output in the forward and one contiguous read in the backward.
    """
    if n_rows == 0 or vocab == 0 or not _config.get_keep_logits():
        return 0
    rows, cols = plan_tiles(n_rows, vocab, elem_bytes=elem_bytes, heads=heads)
    chunks = -(-vocab // cols)
    if rows < n_rows or heads * chunks * cols * n_rows * elem_bytes > CACHE_FRACTION * _config.get_workspace_bytes():
        return 0
    return cols


def cache_shape(n_rows: int, vocab: int, *, elem_bytes: int = 4, heads: int = 1) -> tuple[int, ...]:
    """Shape of the cache :func:`plan_cache` allows (``(0,)`` when nothing is kept)."""
    cols = plan_cache(n_rows, vocab, elem_bytes=elem_bytes, heads=heads)
    if not cols:
        return (0,)
    return (heads, -(-vocab // cols), n_rows, cols)


def ranges(total: int, step: int):
    """``(start, stop)`` over ``[0, total)`` in steps of ``step``."""
    for start in range(0, total, step):
        yield start, min(start + step, total)


# --------------------------------------------------------------------------- fp32 GEMM accumulation

_HAS_MM_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads()
_mm_out_dtype_ok: dict = {}


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a @ b``; 16-bit CUDA operands stay on the tensor cores (``mm(out_dtype=fp32)``), with no
    rounding of the product to 16 bits.  Elsewhere the operands are upcast."""
    if a.dtype in (torch.float32, torch.float64) and a.dtype == b.dtype:
        return a @ b
    if a.is_cuda and _HAS_MM_DTYPE:
        key = (a.device.index, a.dtype)
        if _mm_out_dtype_ok.get(key, True):
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except torch.OutOfMemoryError:
                raise  # a real error, not a missing feature
            except (TypeError, RuntimeError, NotImplementedError) as exc:
                _mm_out_dtype_ok[key] = False
                log.warning("fastpref: torch.mm(out_dtype=float32) unavailable (%s); upcasting operands", exc)
    return a.float() @ b.float()


_HAS_ADDMM_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()
_addmm_out_dtype_ok: dict = {}


def addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """In place ``acc += a @ b`` with ``acc`` in fp32 / fp64 and any operand dtypes.

    16-bit CUDA operands accumulate straight into the fp32 ``acc`` (``addmm(out_dtype=fp32)``, mixed
    dtypes from torch 2.10; tried once per device and dtype), with no temporary product."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _HAS_ADDMM_DTYPE and acc.dtype == torch.float32:
        key = (a.device.index, a.dtype)
        if _addmm_out_dtype_ok.get(key, True):
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                return
            except torch.OutOfMemoryError:
                raise
            except (TypeError, RuntimeError, NotImplementedError) as exc:
                _addmm_out_dtype_ok[key] = False
                log.info("fastpref: addmm(out_dtype=float32) with %s operands unavailable (%s)", a.dtype, exc)
    acc += mm_f32(a, b).to(acc.dtype)


def mm_out(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` with fp32 accumulation, rounded once into ``out``'s dtype."""
    if a.dtype == b.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(mm_f32(a, b))


class GradAccumulator:
    """Gradient buffers of one backward pass over vocabulary chunks (outer) and row tiles (inner).

    ``d hidden`` is written directly when the vocabulary is one chunk, else accumulated in fp32
    (fp64 for fp64) — the gradient's own shape; each chunk's ``d W`` slice is complete after its row
    tiles: one GEMM straight into ``d W`` when all rows are one tile (the planner's aim), else
    accumulated through a ``[cols x D]`` fp32 tile for 16-bit heads; ``d bias`` sums ``dz``'s columns
    in fp32.  ``None`` marks a gradient nobody needs.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                 need_hidden: bool, need_weight: bool, need_bias: bool, chunks: int, rows: int, cols: int):
        n, dim = hidden.shape
        self.acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.hidden_dtype = hidden.dtype
        self.single_rows = rows >= n
        self.d_hidden = self.dh_acc = self.d_weight = self.dw_acc = self.d_bias = None
        if need_hidden:
            if chunks == 1:
                self.d_hidden = torch.empty_like(hidden)
            else:
                self.dh_acc = hidden.new_zeros(n, dim, dtype=self.acc_dtype)
        if need_weight:  # an empty batch adds nothing: zeros (elsewhere every slice is written or zeroed)
            self.d_weight = torch.zeros_like(weight) if n == 0 else torch.empty_like(weight)
            if not self.single_rows and weight.dtype != self.acc_dtype:
                self.dw_acc = weight.new_empty(cols, dim, dtype=self.acc_dtype)
        if need_bias:
            self.d_bias = weight.new_zeros(weight.shape[0], dtype=self.acc_dtype)

    @property
    def any(self) -> bool:
        return any(t is not None for t in (self.d_hidden, self.dh_acc, self.d_weight, self.d_bias))

    def begin_chunk(self, c0: int, c1: int) -> None:
        if self.d_weight is not None and not self.single_rows:
            self._w = self.dw_acc[: c1 - c0] if self.dw_acc is not None else self.d_weight[c0:c1]
            self._w.zero_()

    def add(self, dz: torch.Tensor, h: torch.Tensor, w: torch.Tensor, r0: int, r1: int, c0: int, c1: int,
            bias_sums: Optional[torch.Tensor] = None) -> None:
        """One ``dz [r1-r0, c1-c0]`` tile of rows ``r0:r1``, columns ``c0:c1`` (``w = weight[c0:c1]``);
        ``bias_sums``: ``dz``'s column sums when a kernel already formed them."""
        if self.d_hidden is not None:
            mm_out(self.d_hidden[r0:r1], dz, w)
        elif self.dh_acc is not None:
            addmm_into(self.dh_acc[r0:r1], dz, w)
        if self.d_weight is not None:
            if self.single_rows:
                mm_out(self.d_weight[c0:c1], dz.T, h)
            else:
                addmm_into(self._w, dz.T, h)
        if self.d_bias is not None:
            self.d_bias[c0:c1] += dz.sum(0, dtype=self.acc_dtype) if bias_sums is None else bias_sums

    def end_chunk(self, c0: int, c1: int) -> None:
        if self.dw_acc is not None:
            self.d_weight[c0:c1].copy_(self._w)

    def result(self, bias: Optional[torch.Tensor]):
        d_hidden = self.d_hidden
        if d_hidden is None and self.dh_acc is not None:
            d_hidden = self.dh_acc.to(self.hidden_dtype)
        d_bias = None if self.d_bias is None else self.d_bias.to(bias.dtype)
        return d_hidden, self.d_weight, d_bias
