// epilogue.cuh: device code of the CUDA backend's fused logits epilogues (no torch headers).
// cuBLAS writes one [rows x cols] tile of raw logits; each kernel below then reads that tile once
// (one 256-thread block per row, 16-byte vector loads where the row is aligned) and does what
// would otherwise be ~10 elementwise torch ops with as many tile round-trips: bias, scale,
// softcap and temperature, then either the contract's partial row statistics of the tile's
// vocabulary slice, merged into the running ones (forward: max, sum-exp, target, entropy,
// sum p^2, sum z, max before the label; two heads' max / sum / KL cross term / student entropy,
// JSD's KL sums), or dz, written in place (or into a narrower dtype) for the GEMMs (backward).
#pragma once

#include <cfloat>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastpref_params.h"

namespace fastpref {
namespace epilogue {

constexpr int kThreads = 256;  // every kernel is launched with exactly this many threads
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------ element types

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// N consecutive elements moved as one aligned load/store (16 bytes for N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

// ------------------------------------------------------------------ row sweeps
//
// A row of n columns is visited by all kThreads threads of the block: a scalar head up to the
// first column where every pointer involved is VEC-aligned, a VEC-wide body, a scalar tail.
// Tensor rows are sizeof(T)-aligned, so "aligned" only depends on an element phase mod VEC;
// pointers whose phases differ (e.g. odd row strides of different dtypes) take the scalar path.

template <typename T, int VEC>
__device__ __forceinline__ int phase_of(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % VEC);
}

// Columns [0, head) are visited one by one; head == n means "no vector path for this row".
template <int VEC>
__device__ __forceinline__ int vector_head(bool same_phase, int phase, int n) {
  if (!same_phase) return n;
  const int head = (VEC - phase) % VEC;
  return head < n ? head : n;
}

template <int VEC, class ScalarFn, class VectorFn>
__device__ __forceinline__ void sweep_row(int n, int head, ScalarFn&& scalar, VectorFn&& vector) {
  for (int j = threadIdx.x; j < head; j += kThreads) scalar(j);
  const int n_vec = (n - head) / VEC;  // head <= n
  for (int v = threadIdx.x; v < n_vec; v += kThreads) vector(head + v * VEC);
  for (int j = head + n_vec * VEC + threadIdx.x; j < n; j += kThreads) scalar(j);
}

template <typename T, int VEC>
__device__ __forceinline__ void zero_row(T* row, int n) {
  const int head = vector_head<VEC>(true, phase_of<T, VEC>(row), n);
  Pack<T, VEC> zeros;
#pragma unroll
  for (int k = 0; k < VEC; ++k) zeros.v[k] = from_float<T>(0.f);
  sweep_row<VEC>(
      n, head, [&](int j) { row[j] = from_float<T>(0.f); }, [&](int j) { store_pack<T, VEC>(row + j, zeros); });
}

// ------------------------------------------------------------------ logits transform

// The contract's transform (docs/design.md §2.1): z = cap * tanh((u + b) * inv_temp / cap), or
// (u + b) * inv_temp without a softcap; its chain rule needs only z.
struct Transform {
  const float* bias;
  float inv_temp;
  float cap;
  float inv_cap;
  float pre;  // the factor in front of (u + b): inv_temp / cap, or inv_temp

  __device__ __forceinline__ explicit Transform(const LogitsTransform& t)
      : bias(t.bias),
        inv_temp(t.inv_temp),
        cap(t.cap),
        inv_cap(t.cap > 0.f ? 1.f / t.cap : 0.f),
        pre(t.cap > 0.f ? t.inv_temp / t.cap : t.inv_temp) {}

  // z from the raw GEMM value u of column j.  Thread 0 recomputes the label's z with this same
  // function, so the target compares bit-exactly with the row max (is_top1).
  __device__ __forceinline__ float operator()(float u, int j) const {
    const float v = bias != nullptr ? u + bias[j] : u;
    return cap > 0.f ? cap * tanhf(v * pre) : v * pre;
  }

  // d loss / d u from d loss / d z at the transformed value z: inv_temp * (1 - (z / cap)^2).
  __device__ __forceinline__ float chain(float dz, float z) const {
    if (cap > 0.f) {
      const float t = z * inv_cap;
      dz *= 1.f - t * t;
    }
    return dz * inv_temp;
  }
};

// ------------------------------------------------------------------ reductions

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// e^{m_old - m_new}, or 0 for an empty accumulator (s == 0, whose m may be -inf or -FLT_MAX).
__device__ __forceinline__ float rescale(float s, float m_old, float m_new) {
  return s > 0.f ? expf(m_old - m_new) : 0.f;
}

// A sum t = sum e^{z - m} (z - m) kept relative to the running max m (so that an entropy
// log s - t / s never subtracts two large numbers): moving the max to m' makes it
// r (t + (m - m') s), r = e^{m - m'}.
__device__ __forceinline__ float shift_t(float t, float s, float r, float m_old, float m_new) {
  return s > 0.f ? r * (t + (m_old - m_new) * s) : 0.f;
}

// The partial logprobs planes of one row over some columns (docs/design.md §3.2), relative to
// their max m.  m starts at -FLT_MAX (not -inf) so that e^{m - z} of the first push is 0, never
// e^{-inf - (-inf)}.  A NaN z lands in the else branch and makes s NaN: NaN inputs propagate.
struct LpAcc {
  float m;
  float s;       // sum e^{z - m}
  float t;       // sum e^{z - m} (z - m)  (entropy)
  float q;       // sum e^{2 (z - m)}      (log_sum_sq_probs)
  float zsum;    // sum z                  (mean_logits)
  float before;  // max z before the label (is_top1)

  __device__ __forceinline__ static LpAcc empty() { return {-FLT_MAX, 0.f, 0.f, 0.f, 0.f, neg_inf()}; }

  __device__ __forceinline__ void push(float z, bool want_t, bool want_q) {
    if (z > m) {
      const float r = expf(m - z);
      if (want_t) t = shift_t(t, s, r, m, z);  // the new element contributes (z - z) = 0
      if (want_q) q = q * r * r + 1.f;
      s = s * r + 1.f;
      m = z;
    } else {
      const float d = z - m;
      const float e = expf(d);
      s += e;
      if (want_t) t += e * d;
      if (want_q) q += e * e;
    }
  }
};

__device__ __forceinline__ LpAcc merge(const LpAcc& a, const LpAcc& b) {
  const float m = fmaxf(a.m, b.m);
  const float ra = rescale(a.s, a.m, m);
  const float rb = rescale(b.s, b.m, m);
  return {m,
          a.s * ra + b.s * rb,
          shift_t(a.t, a.s, ra, a.m, m) + shift_t(b.t, b.s, rb, b.m, m),
          a.q * ra * ra + b.q * rb * rb,
          a.zsum + b.zsum,
          fmaxf(a.before, b.before)};
}

__device__ __forceinline__ LpAcc shfl_xor(const LpAcc& a, int mask) {
  return {__shfl_xor_sync(kFullMask, a.m, mask),    __shfl_xor_sync(kFullMask, a.s, mask),
          __shfl_xor_sync(kFullMask, a.t, mask),    __shfl_xor_sync(kFullMask, a.q, mask),
          __shfl_xor_sync(kFullMask, a.zsum, mask), __shfl_xor_sync(kFullMask, a.before, mask)};
}

// One divergence head's running max m, s = sum e^{z - m}, a side sum w = sum e^{z - m} x (the KL
// cross term) and t = sum e^{z - m} (z - m) (the student entropy).
struct HeadAcc {
  float m;
  float s;
  float w;
  float t;

  __device__ __forceinline__ static HeadAcc empty() { return {-FLT_MAX, 0.f, 0.f, 0.f}; }

  __device__ __forceinline__ void push(float z, float x, bool want_t) {
    if (z > m) {
      const float r = expf(m - z);
      if (want_t) t = shift_t(t, s, r, m, z);
      w = w * r + x;
      s = s * r + 1.f;
      m = z;
    } else {
      const float d = z - m;
      const float e = expf(d);
      s += e;
      w += e * x;
      if (want_t) t += e * d;
    }
  }
};

__device__ __forceinline__ HeadAcc merge(const HeadAcc& a, const HeadAcc& b) {
  const float m = fmaxf(a.m, b.m);
  const float ra = rescale(a.s, a.m, m);
  const float rb = rescale(b.s, b.m, m);
  return {m, a.s * ra + b.s * rb, a.w * ra + b.w * rb, shift_t(a.t, a.s, ra, a.m, m) + shift_t(b.t, b.s, rb, b.m, m)};
}

__device__ __forceinline__ HeadAcc shfl_xor(const HeadAcc& a, int mask) {
  return {__shfl_xor_sync(kFullMask, a.m, mask), __shfl_xor_sync(kFullMask, a.s, mask),
          __shfl_xor_sync(kFullMask, a.w, mask), __shfl_xor_sync(kFullMask, a.t, mask)};
}

struct Sum2 {
  float a;
  float b;
};

__device__ __forceinline__ Sum2 merge(const Sum2& x, const Sum2& y) { return {x.a + y.a, x.b + y.b}; }

__device__ __forceinline__ Sum2 shfl_xor(const Sum2& x, int mask) {
  return {__shfl_xor_sync(kFullMask, x.a, mask), __shfl_xor_sync(kFullMask, x.b, mask)};
}

// Every thread of the block gets the reduction of all threads' values (same order, same bits).
// Must be called by all kThreads threads; `smem` holds kWarps values and is free again on return.
template <class R>
__device__ __forceinline__ R block_allreduce(R v, R* smem) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = merge(v, shfl_xor(v, mask));
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  R out = smem[0];
#pragma unroll
  for (int k = 1; k < kWarps; ++k) out = merge(out, smem[k]);
  __syncthreads();  // all reads of smem are done before anyone writes it again
  return out;
}

// log(exp(a) + exp(b)) without overflow; NaN in, NaN out.
__device__ __forceinline__ float log_add_exp(float a, float b) {
  const float mx = fmaxf(a, b);
  return mx + log1pf(expf(-fabsf(a - b)));
}

// ------------------------------------------------------------------ linear_logprobs forward
//
// Folds one tile into the row's partial statistics (docs/design.md §3.2): the tile's own planes
// by an online pass, then one merge with what earlier tiles of the row left in `stats` (thread 0).
// Labels are global ids: the target is added if the label falls in this tile's columns, and
// "before the label" means global column < label.  Masking of ignored / invalid rows happens
// when the host finishes the merged statistics (contract.finish_logprobs).
// Traffic: reads the tile once (rows * cols * sizeof(Tz)), reads and writes 7 floats per row.
// Per element: 1 exp (plus 1 more when the running max moves), 1-4 FMAs, tanh with a softcap.

template <typename Tz, int VEC>
__global__ void __launch_bounds__(kThreads) logprobs_fwd_kernel(const LogprobsFwdParams p) {
  __shared__ LpAcc smem[kWarps];
  const int64_t row = blockIdx.x;
  const Tz* z = static_cast<const Tz*>(p.logits) + row * p.logits_row_stride;
  const Transform tf(p.tf);
  const bool want_t = (p.want & kWantEntropy) != 0;
  const bool want_q = (p.want & kWantSumSq) != 0;
  const bool want_zsum = (p.want & kWantZsum) != 0;
  const bool want_before = (p.want & kWantBefore) != 0;
  const int64_t local = p.labels[row] - p.col0;  // the label's column in this tile, if it is here
  const int before_end = static_cast<int>(local < 0 ? 0 : (local > p.cols ? p.cols : local));

  LpAcc acc = LpAcc::empty();
  auto visit = [&](int j, float u) {
    const float zj = tf(u, j);
    acc.push(zj, want_t, want_q);
    if (want_zsum) acc.zsum += zj;
    if (want_before && j < before_end) acc.before = fmaxf(acc.before, zj);
  };
  const int head = vector_head<VEC>(true, phase_of<Tz, VEC>(z), p.cols);
  sweep_row<VEC>(
      p.cols, head, [&](int j) { visit(j, to_float(z[j])); },
      [&](int j) {
        const Pack<Tz, VEC> v = load_pack<Tz, VEC>(z + j);
#pragma unroll
        for (int k = 0; k < VEC; ++k) visit(j + k, to_float(v.v[k]));
      });
  acc = block_allreduce(acc, smem);
  if (threadIdx.x != 0) return;

  float* st = p.stats + row;
  const int64_t ps = p.plane_stride;
  const LpAcc old{st[kLpMax * ps], st[kLpSum * ps],  st[kLpEnt * ps],
                  st[kLpSq * ps],  st[kLpZsum * ps], st[kLpBefore * ps]};
  const LpAcc out = merge(old, acc);
  st[kLpMax * ps] = out.m;
  st[kLpSum * ps] = out.s;
  // Planes not asked for keep their values (their merges would rescale what was never accumulated).
  if (want_t) st[kLpEnt * ps] = out.t;
  if (want_q) st[kLpSq * ps] = out.q;
  if (want_zsum) st[kLpZsum * ps] = out.zsum;
  if (want_before) st[kLpBefore * ps] = out.before;
  if (local >= 0 && local < p.cols) st[kLpTarget * ps] += tf(to_float(z[local]), static_cast<int>(local));
}

// ------------------------------------------------------------------ linear_logprobs backward
//
// dz_j = g (1[j == y] - p_j) - g_ent p_j (z_j - sum_k p_k z_k), chained through the transform;
// p_j = exp(z_j - lse) from the forward's merged lse, so every tile is independent.  The upstream
// gradients arrive masked (0 on ignored rows, NaN on invalid labels): a row with g = g_ent = 0
// only zeroes its dz.  Traffic: reads the tile once, writes dz once (in place when the dtypes
// match).  No __restrict__: logits and dz may be the same memory.  Each element is read and then
// written by the same thread (a whole Pack is loaded before it is stored), so in place is safe.

template <typename Tz, typename Tdz, int VEC>
__global__ void __launch_bounds__(kThreads) logprobs_grad_kernel(const LogprobsGradParams p) {
  const int64_t row = blockIdx.x;
  const Tz* z = static_cast<const Tz*>(p.logits) + row * p.logits_row_stride;
  Tdz* dz = static_cast<Tdz*>(p.dz) + row * p.dz_row_stride;
  const float g = p.grad_logp[row];
  const float ge = p.grad_entropy != nullptr ? p.grad_entropy[row] : 0.f;
  if (g == 0.f && ge == 0.f) {  // uniform across the block; this kernel has no barrier
    zero_row<Tdz, VEC>(dz, p.cols);
    return;
  }
  const Transform tf(p.tf);
  const float lse = p.lse[row];
  const float mean_z = p.grad_entropy != nullptr ? lse - p.entropy[row] : 0.f;  // sum_k p_k z_k
  const int64_t local = p.labels[row] - p.col0;

  auto grad_at = [&](int j, float u) -> float {
    const float zj = tf(u, j);
    const float prob = expf(zj - lse);
    float d = -prob * (g + ge * (zj - mean_z));
    if (j == local) d += g;
    return tf.chain(d, zj);
  };
  const int head = vector_head<VEC>(phase_of<Tz, VEC>(z) == phase_of<Tdz, VEC>(dz), phase_of<Tz, VEC>(z), p.cols);
  sweep_row<VEC>(
      p.cols, head, [&](int j) { dz[j] = from_float<Tdz>(grad_at(j, to_float(z[j]))); },
      [&](int j) {
        const Pack<Tz, VEC> v = load_pack<Tz, VEC>(z + j);
        Pack<Tdz, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = from_float<Tdz>(grad_at(j + k, to_float(v.v[k])));
        store_pack<Tdz, VEC>(dz + j, out);
      });
}

// ------------------------------------------------------------------ linear_divergence forward
//
// Pass 0 streams both heads and folds the tile into the online planes (docs/design.md §3.3):
// each head's (max, sum), the KL cross term (forward KL: sum e^{zt - mt} (zt - zs) on the
// teacher's scale; reverse KL: sum e^{zs - ms} (zs - zt) on the student's) and, on request, the
// student entropy term.  JSD needs both log-sum-exps of the whole vocabulary first: pass 1 takes
// them (`lse`, merged by the host, possibly across ranks) and adds the tile's KL(pt||m) and
// KL(ps||m) sums.  Traffic per pass: reads both tiles once, reads and writes a few floats per row.

template <typename Tz, int VEC>
__global__ void __launch_bounds__(kThreads) divergence_fwd_kernel(const DivergenceFwdParams p) {
  __shared__ HeadAcc smem_head[kWarps];
  __shared__ Sum2 smem_sum[kWarps];
  const int64_t row = blockIdx.x;
  const Tz* zs = static_cast<const Tz*>(p.s_logits) + row * p.s_row_stride;
  const Tz* zt = static_cast<const Tz*>(p.t_logits) + row * p.t_row_stride;
  const Transform tfs(p.s_tf);
  const Transform tft(p.t_tf);
  const int phase = phase_of<Tz, VEC>(zs);
  const int head = vector_head<VEC>(phase == phase_of<Tz, VEC>(zt), phase, p.cols);
  float* st = p.stats + row;
  const int64_t ps = p.plane_stride;

  // visit(j, us, ut) for every column, vectorised over both tiles.
  auto sweep = [&](auto&& visit) {
    sweep_row<VEC>(
        p.cols, head, [&](int j) { visit(j, to_float(zs[j]), to_float(zt[j])); },
        [&](int j) {
          const Pack<Tz, VEC> vs = load_pack<Tz, VEC>(zs + j);
          const Pack<Tz, VEC> vt = load_pack<Tz, VEC>(zt + j);
#pragma unroll
          for (int k = 0; k < VEC; ++k) visit(j + k, to_float(vs.v[k]), to_float(vt.v[k]));
        });
  };

  if (p.pass == 0) {
    const bool fkl = p.kind == kForwardKl;
    const bool rkl = p.kind == kReverseKl;
    const bool want_t = p.want_entropy;
    HeadAcc as = HeadAcc::empty();
    HeadAcc at = HeadAcc::empty();
    sweep([&](int j, float us, float ut) {
      const float s = tfs(us, j);
      const float t = tft(ut, j);
      as.push(s, rkl ? s - t : 0.f, want_t);
      at.push(t, fkl ? t - s : 0.f, false);
    });
    as = block_allreduce(as, smem_head);
    at = block_allreduce(at, smem_head);  // smem_head is free again after the first call
    if (threadIdx.x != 0) return;
    const float cross = st[kDvCross * ps];
    const HeadAcc s_out = merge(HeadAcc{st[kDvSmax * ps], st[kDvSsum * ps], rkl ? cross : 0.f, st[kDvSent * ps]}, as);
    const HeadAcc t_out = merge(HeadAcc{st[kDvTmax * ps], st[kDvTsum * ps], fkl ? cross : 0.f, 0.f}, at);
    st[kDvSmax * ps] = s_out.m;
    st[kDvSsum * ps] = s_out.s;
    if (want_t) st[kDvSent * ps] = s_out.t;  // planes not asked for keep their values
    st[kDvTmax * ps] = t_out.m;
    st[kDvTsum * ps] = t_out.s;
    if (fkl || rkl) st[kDvCross * ps] = fkl ? t_out.w : s_out.w;
    return;
  }

  const float lse_s = p.lse[2 * row];
  const float lse_t = p.lse[2 * row + 1];
  Sum2 acc{0.f, 0.f};
  sweep([&](int j, float us, float ut) {
    const float log_ps = tfs(us, j) - lse_s;
    const float log_pt = tft(ut, j) - lse_t;
    const float log_m = log_add_exp(log_pt + p.log_beta, log_ps + p.log_one_minus_beta);
    acc.a += expf(log_pt) * (log_pt - log_m);  // KL(pt || m)
    acc.b += expf(log_ps) * (log_ps - log_m);  // KL(ps || m)
  });
  acc = block_allreduce(acc, smem_sum);
  if (threadIdx.x != 0) return;
  st[kDvKlt * ps] += acc.a;
  st[kDvKls * ps] += acc.b;
}

// ------------------------------------------------------------------ linear_divergence backward
//
// d div / d zs:  forward KL  ps - pt;   reverse KL  ps (log ps - log pt - RKL);
// JSD  (1 - beta) ps (log ps - log m - KL(ps||m)); times the (masked) upstream grad, chained
// through the student's transform.  Traffic: reads both tiles once, writes dz once.

template <typename Tz, typename Tdz, int VEC>
__global__ void __launch_bounds__(kThreads) divergence_grad_kernel(const DivergenceGradParams p) {
  const int64_t row = blockIdx.x;
  const Tz* zs = static_cast<const Tz*>(p.s_logits) + row * p.s_row_stride;
  const Tz* zt = static_cast<const Tz*>(p.t_logits) + row * p.t_row_stride;
  Tdz* dz = static_cast<Tdz*>(p.dz) + row * p.dz_row_stride;  // may alias zs
  const float g = p.grad[row];
  if (g == 0.f) {  // an ignored row (uniform across the block; no barrier below)
    zero_row<Tdz, VEC>(dz, p.cols);
    return;
  }
  const Transform tfs(p.s_tf);
  const Transform tft(p.t_tf);
  const float lse_s = p.saved[row * 3 + 0];
  const float lse_t = p.saved[row * 3 + 1];
  const float aux = p.saved[row * 3 + 2];
  const int kind = p.kind;
  const float g_jsd = g * p.one_minus_beta;

  auto grad_at = [&](int j, float us, float ut) -> float {
    const float s = tfs(us, j);
    const float log_ps = s - lse_s;
    const float log_pt = tft(ut, j) - lse_t;
    const float ps = expf(log_ps);
    float d;
    if (kind == kForwardKl) {
      d = g * (ps - expf(log_pt));
    } else if (kind == kReverseKl) {
      d = g * ps * (log_ps - log_pt - aux);
    } else {
      const float log_m = log_add_exp(log_pt + p.log_beta, log_ps + p.log_one_minus_beta);
      d = g_jsd * ps * (log_ps - log_m - aux);
    }
    return tfs.chain(d, s);
  };
  const int phase = phase_of<Tz, VEC>(zs);
  const bool same_phase = phase == phase_of<Tz, VEC>(zt) && phase == phase_of<Tdz, VEC>(dz);
  const int head = vector_head<VEC>(same_phase, phase, p.cols);
  sweep_row<VEC>(
      p.cols, head, [&](int j) { dz[j] = from_float<Tdz>(grad_at(j, to_float(zs[j]), to_float(zt[j]))); },
      [&](int j) {
        const Pack<Tz, VEC> vs = load_pack<Tz, VEC>(zs + j);
        const Pack<Tz, VEC> vt = load_pack<Tz, VEC>(zt + j);
        Pack<Tdz, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = from_float<Tdz>(grad_at(j + k, to_float(vs.v[k]), to_float(vt.v[k])));
        store_pack<Tdz, VEC>(dz + j, out);
      });
}

}  // namespace epilogue
}  // namespace fastpref
