// fastpref_params.h: plain parameter structs shared by the torch host code (fastpref_api.cpp)
// and the device code (epilogue.cuh / epilogue.cu), which never includes torch.
// One struct per fused epilogue: cuBLAS has written a [rows x cols] tile of raw logits
// u = h @ W.T (columns [col0, col0 + cols) of the vocabulary); the epilogue turns it into the
// contract's partial row statistics (forward, docs/design.md §3) or into dz (backward) in one read
// of the tile.  All row arrays are indexed by the tile's row: the host passes row-sliced views,
// so row i of the tile is row i of every array.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastpref {

// Element type of a logits / dz tile.  Accumulation is always fp32.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Divergence kinds (same ints as fastpref.backends.contract.Kind).
constexpr int kForwardKl = 0;
constexpr int kReverseKl = 1;
constexpr int kJsd = 2;

// Statistic planes (same ints as fastpref.backends.contract.LP_* / DV_*).  Over the tile's slice of
// the vocabulary, relative to the slice's running max m:
constexpr int kLpMax = 0;     // m = max z
constexpr int kLpSum = 1;     // sum e^{z - m}
constexpr int kLpTarget = 2;  // z[label] if the label is in the slice, else 0
constexpr int kLpEnt = 3;     // sum e^{z - m} (z - m)
constexpr int kLpSq = 4;      // sum e^{2 (z - m)}
constexpr int kLpZsum = 5;    // sum z
constexpr int kLpBefore = 6;  // max of z[v] over the columns v < label, -inf if none
constexpr int kLpPlanes = 7;

constexpr int kDvSmax = 0;   // student max
constexpr int kDvSsum = 1;   // student sum e^{zs - ms}
constexpr int kDvTmax = 2;   // teacher max
constexpr int kDvTsum = 3;   // teacher sum e^{zt - mt}
constexpr int kDvCross = 4;  // forward KL: sum e^{zt - mt} (zt - zs); reverse KL: sum e^{zs - ms} (zs - zt)
constexpr int kDvSent = 5;   // sum e^{zs - ms} (zs - ms)           (student entropy)
constexpr int kDvKlt = 6;    // JSD: sum pt (log pt - log m)         (plain sums against a given lse)
constexpr int kDvKls = 7;    // JSD: sum ps (log ps - log m)
constexpr int kDvPlanes = 8;

// Which optional logprobs planes the forward computes (the others keep their initial values).
constexpr int32_t kWantEntropy = 1;  // kLpEnt
constexpr int32_t kWantSumSq = 2;    // kLpSq
constexpr int32_t kWantZsum = 4;     // kLpZsum
constexpr int32_t kWantBefore = 8;   // kLpBefore

// The contract's two-parameter transform (docs/design.md §2.1): with v = u + bias[j],
//   z = cap * tanh(v * inv_temp / cap)   (cap > 0),   z = v * inv_temp   (no softcap),
// inv_temp = logit_scale / temperature, cap = softcap / temperature.
struct LogitsTransform {
  const float* bias;  // [cols] fp32, already sliced to the tile's columns; nullptr: no bias
  float inv_temp;
  float cap;  // <= 0: no softcap
};

// Statistics live as [planes x N] fp32 tensors; the host passes the column slice of the tile's
// rows, so plane k of tile row i is stats[k * plane_stride + i].  Every forward epilogue *merges*
// its tile into them (a max, then a sum of rescaled planes), so the host initialises them to the
// merge identity (contract.empty_*_stats) and a row's tiles may come in any order.
struct LogprobsFwdParams {
  const void* logits;  // [rows x cols] raw GEMM output, row stride logits_row_stride, unit column stride
  DType logits_dtype;
  int64_t logits_row_stride;
  int64_t rows;
  int32_t cols;
  int64_t col0;  // global vocabulary index of the tile's first column (vocab_start + chunk offset)
  LogitsTransform tf;
  const int64_t* labels;  // [rows] global token ids (any value: ignored / invalid rows are masked later)
  int32_t want;           // kWant* bits
  float* stats;           // [kLpPlanes x rows], read and written
  int64_t plane_stride;
};

struct LogprobsGradParams {
  const void* logits;  // [rows x cols] raw GEMM output (may be the same memory as dz)
  DType logits_dtype;
  int64_t logits_row_stride;
  void* dz;  // [rows x cols] d loss / d u, written; may alias logits (in place)
  DType dz_dtype;
  int64_t dz_row_stride;
  int64_t rows;
  int32_t cols;
  int64_t col0;
  LogitsTransform tf;
  const int64_t* labels;      // [rows] global token ids
  const float* grad_logp;     // [rows] masked upstream gradient (0: ignored row, NaN: invalid label)
  const float* grad_entropy;  // [rows] masked, or nullptr
  const float* lse;           // [rows] merged log-sum-exp from the forward
  const float* entropy;       // [rows] merged entropy; required when grad_entropy is given
};

struct DivergenceFwdParams {
  const void* s_logits;  // student tile [rows x cols]
  const void* t_logits;  // teacher tile [rows x cols], same dtype
  DType logits_dtype;
  int64_t s_row_stride;
  int64_t t_row_stride;
  int64_t rows;
  int32_t cols;
  LogitsTransform s_tf;
  LogitsTransform t_tf;
  int32_t kind;  // kForwardKl / kReverseKl / kJsd
  int32_t pass;  // 0: the online planes (max, sum, cross, entropy); 1 (JSD): the two KL planes
  bool want_entropy;
  float log_beta;            // JSD: log of the teacher's mixture weight
  float log_one_minus_beta;  // JSD: log of the student's
  const float* lse;          // pass 1: [rows x 2] (lse_s, lse_t) of the whole vocabulary, contiguous
  float* stats;              // [kDvPlanes x rows], read and written
  int64_t plane_stride;
};

struct DivergenceGradParams {
  const void* s_logits;  // student tile (may be the same memory as dz)
  const void* t_logits;  // teacher tile, read only
  DType logits_dtype;
  int64_t s_row_stride;
  int64_t t_row_stride;
  void* dz;  // [rows x cols] d loss / d (student u); may alias s_logits
  DType dz_dtype;
  int64_t dz_row_stride;
  int64_t rows;
  int32_t cols;
  LogitsTransform s_tf;
  LogitsTransform t_tf;
  int32_t kind;
  float one_minus_beta;
  float log_beta;
  float log_one_minus_beta;
  const float* grad;   // [rows] masked upstream gradient of div (0 on ignored rows)
  const float* saved;  // [rows x 3] (lse_s, lse_t, aux) from the forward, contiguous
};

// Launch wrappers (epilogue.cu).  They return cudaGetLastError() after the launch, or
// cudaErrorInvalidValue for a shape or a dtype pair that has no instantiation.
cudaError_t run_logprobs_fwd(const LogprobsFwdParams& params, cudaStream_t stream);
cudaError_t run_logprobs_grad(const LogprobsGradParams& params, cudaStream_t stream);
cudaError_t run_divergence_fwd(const DivergenceFwdParams& params, cudaStream_t stream);
cudaError_t run_divergence_grad(const DivergenceGradParams& params, cudaStream_t stream);

}  // namespace fastpref
