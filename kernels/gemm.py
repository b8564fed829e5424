"""The GEMM side of the backward passes: how wide a ``dz`` workspace chunk may be, and
``acc32 += a @ b`` with fp32 accumulation for 16-bit operands (library GEMMs; no Triton here).

``d hidden`` accumulates over vocabulary chunks in an fp32 ``[N x D]`` buffer (the gradient's
own shape).  On CUDA, ``torch.mm(..., out_dtype=torch.float32)`` keeps 16-bit operands on the
tensor cores while returning the fp32 product (one rounding per chunk into fp32, none in bf16);
the product is taken in row blocks so its temporary stays under 64 MiB.
"""

from __future__ import annotations

import logging

import torch

from .. import _config

log = logging.getLogger("fastpref")
_TEMP_BYTES = 64 * 2**20
_mm_out_dtype_ok: dict = {}


def dz_chunk_width(n_rows: int, vocab: int, elem_bytes: int, block_v: int) -> int:
    """Vocabulary columns per ``dz`` chunk: ``n_rows * width * elem_bytes <= workspace``,
    a multiple of ``block_v``, at least one tile, at most the vocabulary."""
    width = _config.get_workspace_bytes() // max(1, n_rows * elem_bytes)
    width = max(block_v, width // block_v * block_v)
    return min(width, vocab)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a @ b`` for 16-bit ``a``, ``b`` without rounding the product to 16 bits."""
    if a.device.type == "cuda":
        key = (a.device.index, a.dtype)
        if _mm_out_dtype_ok.get(key, True):
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except torch.OutOfMemoryError:
                raise  # a real error, not a missing feature
            except (TypeError, RuntimeError, NotImplementedError) as exc:
                _mm_out_dtype_ok[key] = False
                log.warning("fastpref: torch.mm(out_dtype=float32) unavailable (%s); upcasting operands", exc)
    return torch.mm(a.float(), b.float())


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """In place ``acc (fp32 [M, K]) += a [M, J] @ b [J, K]``."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    rows = max(1, _TEMP_BYTES // max(1, 4 * acc.shape[1]))
    for r0 in range(0, acc.shape[0], rows):
        acc[r0:r0 + rows] += _mm_f32(a[r0:r0 + rows], b)


def chunk_gradients(dz, db_part, v0, width, hidden, weight, d_hidden, d_weight, d_bias, dh_acc) -> None:
    """The GEMM side of one vocabulary chunk ``[v0, v0 + width)`` of a backward pass.

    ``d_weight[chunk] = dz.T @ hidden`` (complete: the reduction over all rows is one GEMM);
    ``d_hidden (+)= dz @ weight[chunk]`` (into the fp32 ``dh_acc`` when the vocabulary spans several
    chunks, else straight into ``d_hidden``); ``d_bias[chunk]`` from the per-row-tile column sums.
    A ``None`` gradient is not wanted.
    """
    dzc = dz[:, :width]
    if d_weight is not None:
        torch.mm(dzc.t(), hidden, out=d_weight[v0:v0 + width])
    if d_hidden is not None:
        if dh_acc is not None:
            accumulate_mm(dh_acc, dzc, weight[v0:v0 + width])
        else:
            torch.mm(dzc, weight, out=d_hidden)
    if d_bias is not None:
        d_bias[v0:v0 + width] = db_part[:, :width].sum(0).to(d_bias.dtype)
