"""Shared pieces of the fused linear kernels: one logits tile ``[BLOCK_N x BLOCK_V]`` computed
from ``hidden`` and an LM head (bias, scale, softcap and temperature applied), the tanh used by the
softcap, grouped program ordering, and the launch configurations.

A logits tile costs ``2 * BLOCK_N * BLOCK_V * D`` FLOPs and reads ``(BLOCK_N + BLOCK_V) * D``
input elements (from L2 when neighbouring programs share rows or vocabulary tiles); it is
never written to memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
def _logits_tile(
    h_ptr, w_ptr, b_ptr,             # hidden [N, D], head [V, D], bias [V] (ignored unless HAS_BIAS)
    rows, cols,                      # int64 row / vocabulary indices of the tile
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temp, softcap,               # the transform as cap * tanh(u * inv_temp / cap) (docs/design.md §2.1)
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,           # cast operands to fp32 before tl.dot (interpreter, fp32/fp64 inputs)
    PRECISION: tl.constexpr,         # tl.dot input_precision: "ieee" for fp32 inputs
):
    """fp32 ``softcap(tanh)((h @ w.T + b) / T)`` for rows x cols; out-of-range entries use 0 inputs."""
    row_mask = rows < N
    col_mask = cols < V
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        h = tl.load(
            h_ptr + rows[:, None] * stride_hn + d[None, :] * stride_hd,
            mask=row_mask[:, None] & d_mask[None, :], other=0.0,
        )
        w_t = tl.load(  # [BLOCK_D, BLOCK_V]: the head tile, transposed by addressing
            w_ptr + cols[None, :] * stride_wv + d[:, None] * stride_wd,
            mask=col_mask[None, :] & d_mask[:, None], other=0.0,
        )
        if DOT_F32:
            h = h.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(h, w_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    acc = acc * inv_temp
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


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


# --------------------------------------------------------------------------- launch configuration


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int = 8


def tile_config(kernel: str, device: torch.device, dims: tuple) -> TileConfig:
    """Fixed configs (autotuning is opt-in and not wired yet).

    GPU: 128x128 logits tiles with 64-wide D steps (``[128,128]`` fp32 accumulator, 8 warps);
    the two-head divergence kernels hold two accumulators, so 64 rows.
    Interpreter: large tiles on small shapes (its cost is per tile operation, not per element),
    but a D step of 32 so tests still walk several D tiles.
    """
    d_max = max(dims)
    if device.type != "cuda" or interpreting():
        bd = max(16, min(32, triton.next_power_of_2(d_max)))
        return TileConfig(block_n=64, block_v=256, block_d=bd, num_warps=4, num_stages=1)
    two_heads = kernel.startswith("divergence")
    bd = max(16, min(64, triton.next_power_of_2(d_max)))
    # 3 stages of fp32 operands take 128 KiB of shared memory: fine on A100/H100 (163/227 KiB per
    # block), too much on sm_86/89 (99 KiB), where 2 stages fit.
    smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    stages = 3 if smem >= 160 * 1024 else 2
    return TileConfig(block_n=64 if two_heads else 128, block_v=128, block_d=bd, num_warps=8, num_stages=stages)


def dot_flags(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """(DOT_F32, PRECISION) for operands of ``dtype``: fp32 inputs stay exact (no TF32)."""
    full = dtype in (torch.float32, torch.float64)
    return (full or device.type != "cuda" or interpreting()), ("ieee" if full else "tf32")


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
