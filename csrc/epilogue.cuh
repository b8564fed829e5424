// epilogue.cuh: device code of the CUDA backend's fused logits epilogues (no torch headers).
// cuBLAS writes one [rows x cols] logits tile; each kernel below then reads that tile once
// (one 256-thread block per row, 16-byte vector loads where the row is aligned) and does what
// would otherwise be ~10 elementwise torch ops with as many tile round-trips: bias,
// temperature, softcap, online log-sum-exp, target gather, entropy, the two-head KL / JSD
// statistics, and in backward dz, written in place (or into a narrower dtype) for the GEMMs.
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

struct Transform {
  const float* bias;
  float inv_temperature;
  float softcap;
  float inv_softcap;

  __device__ __forceinline__ explicit Transform(const LogitsTransform& t)
      : bias(t.bias),
        inv_temperature(t.inv_temperature),
        softcap(t.softcap),
        inv_softcap(t.softcap > 0.f ? 1.f / t.softcap : 0.f) {}

  // z = softcap * tanh(((u + b) / T) / softcap), from the raw GEMM value u of column j.
  __device__ __forceinline__ float operator()(float u, int j) const {
    float z = bias != nullptr ? u + bias[j] : u;
    z *= inv_temperature;
    if (softcap > 0.f) z = softcap * tanhf(z * inv_softcap);
    return z;
  }

  // d loss / d u from d loss / d z at the transformed value z: (1 - (z / c)^2) / T.
  __device__ __forceinline__ float chain(float dz, float z) const {
    if (softcap > 0.f) {
      const float t = z * inv_softcap;
      dz *= 1.f - t * t;
    }
    return dz * inv_temperature;
  }
};

// ------------------------------------------------------------------ reductions

// Online log-sum-exp with one weighted side sum: after pushing (z_j, x_j) for all j,
//   s = sum_j exp(z_j - m),  w = sum_j exp(z_j - m) * x_j,  m = max_j z_j.
// m starts at -FLT_MAX (not -inf) so that exp(m_old - m_new) never computes -inf - (-inf).
// A NaN z lands in the else branch and makes s NaN, so NaN inputs propagate.
struct OnlineLse {
  float m;
  float s;
  float w;

  __device__ __forceinline__ static OnlineLse empty() { return {-FLT_MAX, 0.f, 0.f}; }

  __device__ __forceinline__ void push(float z, float x) {
    if (z > m) {
      const float r = expf(m - z);
      s = s * r + 1.f;
      w = w * r + x;
      m = z;
    } else {
      const float e = expf(z - m);
      s += e;
      w += e * x;
    }
  }

  __device__ __forceinline__ float lse() const { return m + logf(s); }
};

__device__ __forceinline__ OnlineLse merge(const OnlineLse& a, const OnlineLse& b) {
  const float m = fmaxf(a.m, b.m);
  const float ra = expf(a.m - m);
  const float rb = expf(b.m - m);
  return {m, a.s * ra + b.s * rb, a.w * ra + b.w * rb};
}

__device__ __forceinline__ OnlineLse shfl_xor(const OnlineLse& a, int mask) {
  return {__shfl_xor_sync(kFullMask, a.m, mask), __shfl_xor_sync(kFullMask, a.s, mask),
          __shfl_xor_sync(kFullMask, a.w, mask)};
}

// Online log-sum-exp plus t = sum exp(z - m) * (z - m), kept relative to the running max m so that
// the entropy log(s) - t / s never subtracts two large numbers (a confident row has lse ~ 50 and
// entropy ~ 1e-3).  Moving the max from m to m' turns t into r * (t + (m - m') * s), r = e^{m - m'}.
struct OnlineEnt {
  float m;
  float s;
  float t;

  __device__ __forceinline__ static OnlineEnt empty() { return {-FLT_MAX, 0.f, 0.f}; }

  __device__ __forceinline__ void push(float z) {
    if (z > m) {
      const float r = expf(m - z);
      t = r * (t + (s > 0.f ? (m - z) * s : 0.f));  // the new element contributes (z - z) = 0
      s = s * r + 1.f;
      m = z;
    } else {
      const float e = expf(z - m);
      s += e;
      t += e * (z - m);
    }
  }

  __device__ __forceinline__ float lse() const { return m + logf(s); }
  __device__ __forceinline__ float entropy() const { return logf(s) - t / s; }
};

__device__ __forceinline__ OnlineEnt merge(const OnlineEnt& a, const OnlineEnt& b) {
  const float m = fmaxf(a.m, b.m);
  const float ra = expf(a.m - m);
  const float rb = expf(b.m - m);
  const float ta = a.s > 0.f ? ra * (a.t + (a.m - m) * a.s) : 0.f;
  const float tb = b.s > 0.f ? rb * (b.t + (b.m - m) * b.s) : 0.f;
  return {m, a.s * ra + b.s * rb, ta + tb};
}

__device__ __forceinline__ OnlineEnt shfl_xor(const OnlineEnt& a, int mask) {
  return {__shfl_xor_sync(kFullMask, a.m, mask), __shfl_xor_sync(kFullMask, a.s, mask),
          __shfl_xor_sync(kFullMask, a.t, mask)};
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
// Traffic: reads the tile once (rows * cols * sizeof(Tz)), writes O(rows) floats.
// Per element: 1 exp (plus 1 more when the running max moves), 1-2 FMAs, tanh with softcap.

template <typename Tz, int VEC>
__global__ void __launch_bounds__(kThreads) logprobs_fwd_kernel(const LogprobsFwdParams p) {
  __shared__ OnlineEnt smem[kWarps];
  const int64_t row = blockIdx.x;
  const Tz* z = static_cast<const Tz*>(p.logits) + row * p.logits_row_stride;
  const Transform tf(p.tf);
  const bool with_entropy = p.entropy != nullptr;

  OnlineEnt acc = OnlineEnt::empty();
  auto visit = [&](int j, float u) { acc.push(tf(u, j)); };
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

  const int64_t label = p.labels[row];
  const int64_t local = label - p.col0;  // the target's column in this tile, if it is here
  float target = (local >= 0 && local < p.cols) ? tf(to_float(z[local]), static_cast<int>(local)) : 0.f;
  float* state = p.first_tile && p.last_tile ? nullptr : p.state + row * kLogprobsStateWidth;
  if (!p.first_tile) {
    acc = merge(OnlineEnt{state[0], state[1], state[2]}, acc);
    target += state[3];
  }
  if (!p.last_tile) {
    state[0] = acc.m;
    state[1] = acc.s;
    state[2] = acc.t;
    state[3] = target;
    return;
  }
  const float lse = acc.lse();
  p.lse[row] = lse;
  const bool keep = label != p.ignore_index;
  const bool in_range = label >= 0 && label < p.vocab;
  p.logp[row] = keep ? (in_range ? target - lse : quiet_nan()) : 0.f;
  if (with_entropy) p.entropy[row] = keep ? (in_range ? acc.entropy() : quiet_nan()) : 0.f;
}

// ------------------------------------------------------------------ linear_logprobs backward
//
// dz_j = g (1[j == y] - p_j) - g_ent p_j (z_j - sum_k p_k z_k), chained through softcap and
// temperature; p_j = exp(z_j - lse) from the forward's lse, so every tile is independent.
// Traffic: reads the tile once, writes dz once (in place when the dtypes match).
// No __restrict__: logits and dz may be the same memory.  Each element is read and then
// written by the same thread (a whole Pack is loaded before it is stored), so in place is safe.

template <typename Tz, typename Tdz, int VEC>
__global__ void __launch_bounds__(kThreads) logprobs_grad_kernel(const LogprobsGradParams p) {
  const int64_t row = blockIdx.x;
  const Tz* z = static_cast<const Tz*>(p.logits) + row * p.logits_row_stride;
  Tdz* dz = static_cast<Tdz*>(p.dz) + row * p.dz_row_stride;
  const int64_t label = p.labels[row];
  if (label == p.ignore_index) {  // uniform across the block; this kernel has no barrier
    zero_row<Tdz, VEC>(dz, p.cols);
    return;
  }
  const Transform tf(p.tf);
  const bool in_range = label >= 0 && label < p.vocab;
  const float g = in_range ? p.grad_logp[row] : quiet_nan();
  const float ge = p.grad_entropy != nullptr ? p.grad_entropy[row] : 0.f;
  const float lse = p.lse[row];
  const float mean_z = p.grad_entropy != nullptr ? lse - p.entropy[row] : 0.f;  // sum_k p_k z_k
  const int64_t local = label - p.col0;

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
// Pass 0 streams both heads: online (max, sum) per head plus the KL cross term
//   forward KL: w_t = sum exp(zt - mt) (zt - zs);   reverse KL: w_s = sum exp(zs - ms) (zs - zt),
// so KL = w / s - lse_own + lse_other.  JSD needs both lse first: pass 1 re-reads the tiles
// (still in the workspace when the vocabulary fits one tile) and sums KL(pt||m), KL(ps||m).
// Traffic per pass: reads both tiles once, writes O(rows) floats.

template <typename Tz, int VEC>
__global__ void __launch_bounds__(kThreads) divergence_fwd_kernel(const DivergenceFwdParams p) {
  __shared__ OnlineLse smem_lse[kWarps];
  __shared__ Sum2 smem_sum[kWarps];
  const int64_t row = blockIdx.x;
  const Tz* zs = static_cast<const Tz*>(p.s_logits) + row * p.s_row_stride;
  const Tz* zt = static_cast<const Tz*>(p.t_logits) + row * p.t_row_stride;
  const Transform tfs(p.s_tf);
  const Transform tft(p.t_tf);
  const int phase = phase_of<Tz, VEC>(zs);
  const int head = vector_head<VEC>(phase == phase_of<Tz, VEC>(zt), phase, p.cols);
  float* state = p.first_tile && p.last_tile ? nullptr : p.state + row * kDivergenceStateWidth;
  float* stats = p.stats + row * 3;
  const bool keep = p.labels == nullptr || p.labels[row] != p.ignore_index;

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
    OnlineLse as = OnlineLse::empty();
    OnlineLse at = OnlineLse::empty();
    sweep([&](int j, float us, float ut) {
      const float s = tfs(us, j);
      const float t = tft(ut, j);
      as.push(s, rkl ? s - t : 0.f);
      at.push(t, fkl ? t - s : 0.f);
    });
    as = block_allreduce(as, smem_lse);
    at = block_allreduce(at, smem_lse);  // smem_lse is free again after the first call
    if (threadIdx.x != 0) return;
    if (!p.first_tile) {
      as = merge(OnlineLse{state[0], state[1], state[2]}, as);
      at = merge(OnlineLse{state[3], state[4], state[5]}, at);
    }
    if (!p.last_tile) {
      state[0] = as.m;
      state[1] = as.s;
      state[2] = as.w;
      state[3] = at.m;
      state[4] = at.s;
      state[5] = at.w;
      return;
    }
    const float lse_s = as.lse();
    const float lse_t = at.lse();
    stats[0] = lse_s;
    stats[1] = lse_t;
    if (fkl) {
      const float kl = at.w / at.s - lse_t + lse_s;
      stats[2] = 0.f;
      p.div[row] = keep ? kl : 0.f;
    } else if (rkl) {
      const float kl = as.w / as.s - lse_s + lse_t;
      stats[2] = kl;  // the backward's softmax chain rule needs it
      p.div[row] = keep ? kl : 0.f;
    }
    return;  // JSD: pass 1 writes div and stats[2]
  }

  // pass 1 (JSD): lse_s, lse_t were written by pass 0 (an earlier launch on the same stream).
  const float lse_s = stats[0];
  const float lse_t = stats[1];
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
  if (!p.first_tile) {
    acc.a += state[6];
    acc.b += state[7];
  }
  if (!p.last_tile) {
    state[6] = acc.a;
    state[7] = acc.b;
    return;
  }
  stats[2] = acc.b;
  const float jsd = p.beta * acc.a + (1.f - p.beta) * acc.b;
  p.div[row] = keep ? jsd : 0.f;
}

// ------------------------------------------------------------------ linear_divergence backward
//
// d div / d zs:  forward KL  ps - pt;   reverse KL  ps (log ps - log pt - RKL);
// JSD  (1 - beta) ps (log ps - log m - KL(ps||m)); times the upstream grad, chained through the
// student's softcap and temperature.  Traffic: reads both tiles once, writes dz once.

template <typename Tz, typename Tdz, int VEC>
__global__ void __launch_bounds__(kThreads) divergence_grad_kernel(const DivergenceGradParams p) {
  const int64_t row = blockIdx.x;
  const Tz* zs = static_cast<const Tz*>(p.s_logits) + row * p.s_row_stride;
  const Tz* zt = static_cast<const Tz*>(p.t_logits) + row * p.t_row_stride;
  Tdz* dz = static_cast<Tdz*>(p.dz) + row * p.dz_row_stride;  // may alias zs
  if (p.labels != nullptr && p.labels[row] == p.ignore_index) {  // uniform; no barrier below
    zero_row<Tdz, VEC>(dz, p.cols);
    return;
  }
  const Transform tfs(p.s_tf);
  const Transform tft(p.t_tf);
  const float g = p.grad[row];
  const float lse_s = p.stats[row * 3 + 0];
  const float lse_t = p.stats[row * 3 + 1];
  const float aux = p.stats[row * 3 + 2];
  const int kind = p.kind;
  const float g_jsd = g * (1.f - p.beta);

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
