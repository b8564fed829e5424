"""Shared pieces of the fused linear kernels: one logits tile ``[BLOCK_N x BLOCK_V]`` of a head, the
tanh of the softcap, grouped program ordering, and the launch configurations.

A head travels through the kernels as two tuples built once per kernel:

* ``head = (h_ptr, w_ptr, b_ptr, D, inv_temp, cap)`` — hidden ``[N, D]`` and weight ``[V, D]``
  (contiguous, as the contract guarantees), bias ``[V]`` (any pointer when there is none) and the
  transform ``z = cap * tanh(u * inv_temp / cap)`` (docs/design.md §2.1);
* ``HEAD = (HAS_BIAS, HAS_SOFTCAP, DOT_F32, PRECISION)`` — a compile-time tuple (:func:`head_flags`).

A logits tile costs ``2 * BLOCK_N * BLOCK_V * D`` FLOPs and reads ``(BLOCK_N + BLOCK_V) * D`` input
elements (from L2 when neighbouring programs share rows or vocabulary tiles).  When the workspace
budget lets a forward keep the logits (``tiling.plan_cache``), it also stores each fp32 tile into the
cache ``[heads, N, V]`` and the backward reads it back (:func:`_cached_tile`) instead of recomputing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import tiling

# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _tanh(x):
    """tanh without libdevice: a short Taylor series near 0 (where ``1 - e^{-2|x|}`` cancels),
    ``sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|})`` elsewhere.  Relative error ~1e-7 in fp32."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    # x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835; next term < 1.3e-12 for |x| < 0.125
    near = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.125, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(head, HEAD: tl.constexpr, rows, cols, row_mask, col_mask, BLOCK_D: tl.constexpr):
    """fp32 ``z = cap * tanh(u * inv_temp / cap)`` (``u * inv_temp`` without a softcap),
    ``u = h[rows] @ w[cols].T + b[cols]``, for int64 ``rows [BLOCK_N]`` x ``cols [BLOCK_V]``; masked
    rows / columns read zeros (their values are finite and must be masked by the caller)."""
    h_ptr, w_ptr, b_ptr, D, inv_temp, cap = head
    HAS_BIAS: tl.constexpr = HEAD[0]
    HAS_SOFTCAP: tl.constexpr = HEAD[1]
    DOT_F32: tl.constexpr = HEAD[2]  # cast operands to fp32 first (the interpreter's 16-bit tl.dot is wrong)
    PRECISION: tl.constexpr = HEAD[3]  # tl.dot input_precision for fp32 operands: "ieee" or "tf32"
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        h = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w_t = tl.load(  # [BLOCK_D, BLOCK_V]: the head tile, transposed by addressing
            w_ptr + cols[None, :] * D + d[:, None], mask=col_mask[None, :] & d_mask[:, None], other=0.0,
        )
        if DOT_F32:
            h = h.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(h, w_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_temp
    if HAS_SOFTCAP:
        acc = cap * _tanh(acc / cap)
    return acc


@triton.jit
def _cached_tile(cache_ptr, rows, cols, mask, V):
    """The fp32 logits tile a forward stored into a cache plane ``[N, V]`` (0 where masked)."""
    return tl.load(cache_ptr + rows[:, None] * V + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(cache_ptr, z, rows, cols, mask, V):
    tl.store(cache_ptr + rows[:, None] * V + cols[None, :], z, mask=mask)


@triton.jit
def _chain(dz, z, inv_temp, cap, HAS_SOFTCAP: tl.constexpr):
    """``dz * dz/du`` for ``z = cap * tanh(u * inv_temp / cap)``: ``inv_temp * (1 - (z / cap)^2)``."""
    if HAS_SOFTCAP:
        zc = z / cap
        dz = dz * (1.0 - zc * zc)
    return dz * inv_temp


@triton.jit
def _grouped_pid(pid, num_pid_n, num_pid_v, GROUP_N: tl.constexpr):
    """Row-tile-major groups of GROUP_N row tiles so consecutive programs share head tiles in L2."""
    per_group = GROUP_N * num_pid_v
    group = pid // per_group
    first_n = group * GROUP_N
    size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % size
    pid_v = (pid % per_group) // size
    return pid_n, pid_v


# --------------------------------------------------------------------------- operands and precision


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fp32_matmul_uses_tf32() -> bool:
    """PyTorch's TF32 setting for fp32 matmuls on CUDA (``torch.backends.cuda.matmul.fp32_precision``
    on torch >= 2.9, else ``allow_tf32``; ``torch.set_float32_matmul_precision("high")`` sets both)."""
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", None)
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    try:
        return bool(m.allow_tf32)
    except RuntimeError:  # legacy and new APIs mixed: torch refuses to answer; stay exact
        return False


# Operand classes: what a tile's GEMM runs on.  "16bit": bf16 / fp16 tensor cores; "tf32": fp32
# operands on TF32 tensor cores (PyTorch's TF32 setting on); "ieee": fp32 operands, exact FMA.
OPERANDS = ("16bit", "tf32", "ieee")


def operand_class(dtype: torch.dtype, device: torch.device) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    if device.type == "cuda" and not interpreting() and fp32_matmul_uses_tf32():
        return "tf32"
    return "ieee"


def head_flags(bias, cap, dtype: torch.dtype, device: torch.device) -> tuple:
    """The compile-time ``HEAD`` tuple of a head: ``(HAS_BIAS, HAS_SOFTCAP, DOT_F32, PRECISION)``."""
    return head_flags_for(bias is not None, cap is not None, operand_class(dtype, device),
                          device.type != "cuda" or interpreting())


def head_flags_for(has_bias: bool, has_softcap: bool, operand: str, dot_f32: bool = False) -> tuple:
    return (has_bias, has_softcap, dot_f32 or operand != "16bit", "tf32" if operand == "tf32" else "ieee")


# --------------------------------------------------------------------------- launch configuration


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int = 8
    maxnreg: Optional[int] = None  # ptxas register cap (None: ptxas's own choice)

    def launch_options(self) -> dict:
        """``num_warps`` / ``num_stages`` (/ ``maxnreg``) for a kernel launch."""
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


FAMILIES = ("logprobs_fwd", "logprobs_bwd", "divergence_fwd", "divergence_bwd")

# GPU tiles per GPU class, kernel family and operand class: (BLOCK_N, BLOCK_V, largest BLOCK_D, num_warps[,
# maxnreg]).
# Chosen with the ahead-of-time check (benchmarks/aot_check.py, results in benchmarks/results/aot-*.md):
# no spill in any flag combination (--full), with Triton 3.6 (the GPU machine's) and 3.7, on sm_90a (Hopper: wgmma
# reads its operands from shared memory, so 128-row tiles fit beside the fp32 statistics epilogue;
# the two-head kernels and the 16-bit logprobs forward, whose epilogue holds the most, take 64-column
# tiles) and on sm_80 (Ampere: mma.sync keeps operand fragments in registers too, so smaller tiles).
# "ieee" (exact fp32 on the FMA units) needs no tensor-core shapes: small tiles that do not spill
# (the FMA dot holds both operand fragments in registers: 16-wide D steps).
# A fifth entry, 255, is a register cap (``maxnreg``) for configs where ptxas otherwise caps itself at
# 128 registers (two 256-thread blocks per SM) or 80 and spills a few bytes to get there (the full
# sweep found 4-36 B, in some flag combinations only): with the cap explicit it keeps every value in
# registers.
GPU_TILES = {
    ("sm90", "logprobs_fwd", "16bit"): (128, 64, 64, 8),
    ("sm90", "logprobs_fwd", "tf32"): (64, 128, 32, 8),
    ("sm90", "logprobs_fwd", "ieee"): (64, 64, 16, 8, 255),
    ("sm90", "logprobs_bwd", "16bit"): (128, 64, 64, 8),
    ("sm90", "logprobs_bwd", "tf32"): (128, 64, 32, 8),
    ("sm90", "logprobs_bwd", "ieee"): (64, 128, 32, 8),
    ("sm90", "divergence_fwd", "16bit"): (128, 64, 64, 8),
    ("sm90", "divergence_fwd", "tf32"): (128, 64, 32, 8),
    ("sm90", "divergence_fwd", "ieee"): (64, 64, 16, 8, 255),
    ("sm90", "divergence_bwd", "16bit"): (128, 64, 64, 8),
    ("sm90", "divergence_bwd", "tf32"): (128, 64, 32, 8),
    ("sm90", "divergence_bwd", "ieee"): (64, 64, 32, 8),
    ("sm80", "logprobs_fwd", "16bit"): (64, 128, 64, 8),
    ("sm80", "logprobs_fwd", "tf32"): (64, 128, 32, 8),
    ("sm80", "logprobs_fwd", "ieee"): (64, 64, 16, 8, 255),
    ("sm80", "logprobs_bwd", "16bit"): (64, 128, 64, 8, 255),
    ("sm80", "logprobs_bwd", "tf32"): (128, 64, 32, 8),
    ("sm80", "logprobs_bwd", "ieee"): (64, 64, 16, 8, 255),
    ("sm80", "divergence_fwd", "16bit"): (64, 64, 64, 8),
    ("sm80", "divergence_fwd", "tf32"): (64, 64, 32, 8),
    ("sm80", "divergence_fwd", "ieee"): (64, 64, 16, 8, 255),
    ("sm80", "divergence_bwd", "16bit"): (128, 64, 64, 8, 255),
    ("sm80", "divergence_bwd", "tf32"): (128, 64, 32, 8),
    ("sm80", "divergence_bwd", "ieee"): (64, 64, 32, 8),
}
_SMEM_SLACK = 16 * 1024  # reduction / layout-conversion scratch beside the operand pipeline
_OPERAND_BYTES = {"16bit": 2, "tf32": 4, "ieee": 4}


def family(kernel: str) -> str:
    """The launcher family of a kernel name (``divergence_jsd`` runs with the forward's tiles)."""
    if kernel.startswith("divergence_jsd"):
        return "divergence_fwd"
    for fam in FAMILIES:
        if kernel.startswith(fam):
            return fam
    raise ValueError(f"kernel: unknown kernel family {kernel!r}")


def gpu_class(capability: int) -> str:
    """``"sm90"`` for compute capability >= 9.0 (Hopper and later), else ``"sm80"`` (``capability``: 80, 86, 90...)."""
    return "sm90" if capability >= 90 else "sm80"


def gpu_tile_config(kernel: str, operand: str, d_max: int, capability: int, smem_bytes: int) -> TileConfig:
    """The GPU config of ``kernel`` for operands of class ``operand``, the largest hidden size
    ``d_max``, a GPU of compute ``capability`` (e.g. 80, 90) with ``smem_bytes`` of shared memory per
    block (opt-in): 3 pipeline stages when the operand tiles of 3 fit, else 2 (sm_86 / sm_89, 99 KiB)."""
    bn, bv, bd_max, warps, *cap = GPU_TILES[(gpu_class(capability), family(kernel), operand)]
    bd = max(16, min(bd_max, triton.next_power_of_2(max(d_max, 1))))
    stage = (bn + bv) * bd * _OPERAND_BYTES[operand]
    stages = 3 if 3 * stage + _SMEM_SLACK <= smem_bytes else 2
    return TileConfig(block_n=bn, block_v=bv, block_d=bd, num_warps=warps, num_stages=stages,
                      maxnreg=cap[0] if cap else None)


def gpu_tile_configs(kernel: str, operand: str, capability: int, smem_bytes: int) -> list[TileConfig]:
    """Every config :func:`gpu_tile_config` can return on that GPU for any hidden size (what the
    ahead-of-time check compiles), the realistic one (largest ``BLOCK_D``) first."""
    out = []
    for d in (1 << 16, 32, 16):
        cfg = gpu_tile_config(kernel, operand, d, capability, smem_bytes)
        if cfg not in out:
            out.append(cfg)
    return out


def tile_config(kernel: str, device: torch.device, dims: tuple, dtype: torch.dtype) -> TileConfig:
    """The launch config of ``kernel`` (a family name of :data:`FAMILIES`) for hidden sizes ``dims``
    and operands of ``dtype`` (fp32 if either head is).

    Interpreter: large tiles on small shapes (its cost is per tile operation, not per element), but
    a D step of 32 so tests still walk several D tiles.
    """
    d_max = max(dims)
    if device.type != "cuda" or interpreting():
        bd = max(16, min(32, triton.next_power_of_2(max(d_max, 1))))
        return TileConfig(block_n=64, block_v=256, block_d=bd, num_warps=4, num_stages=1)
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    return gpu_tile_config(kernel, operand_class(dtype, device), d_max, 10 * props.major + props.minor, smem)


def num_vocab_splits(n_row_tiles: int, n_vocab_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, vocab tiles per split) so the forward grid fills the GPU when there are few rows.

    The interpreter uses 2 splits (when there are 2+ vocabulary tiles) so the split combine is
    exercised by CPU tests; it costs nothing there.
    """
    if device.type != "cuda" or interpreting():
        want = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, triton.cdiv(2 * sms, n_row_tiles))
    want = max(1, min(want, n_vocab_tiles))
    per = triton.cdiv(n_vocab_tiles, want)
    return triton.cdiv(n_vocab_tiles, per), per


# --------------------------------------------------------------------------- the logits cache


def cache_planes(n: int, vocab: int, heads: int, wanted: bool) -> int:
    """Heads whose fp32 logits ``[N, V]`` the forward keeps (``heads`` or 0): when a backward will run
    (``wanted``) and the whole logits fit the cache share of the budget (:func:`tiling.plan_cache`)."""
    if not wanted or n == 0 or vocab == 0:
        return 0
    return heads if tiling.plan_cache(n, vocab, elem_bytes=4, heads=heads) else 0


def dz_chunk_columns(n: int, vocab: int, elem_bytes: int, block_v: int, cached: bool) -> int:
    """Columns of the backward's ``dz [N x cols]`` workspace: the whole budget, or beside a cache
    (which holds up to three quarters of it) the remaining quarter."""
    share = round(1 / (1 - tiling.CACHE_FRACTION)) if cached else 1
    return tiling.plan_chunk_columns(n, vocab, elem_bytes=elem_bytes * share, multiple=block_v)
