// fastpref_params.h: plain parameter structs shared by the torch host code (fastpref_api.cpp)
// and the device code (epilogue.cuh / epilogue.cu), which never includes torch.
// One struct per fused epilogue: cuBLAS has written a [rows x cols] logits tile (columns
// [col0, col0 + cols) of the vocabulary); the epilogue turns it into per-row statistics
// (forward) or into dz (backward) in one read of the tile.  All row arrays are indexed by the
// tile's row: the host passes row-sliced views, so row i of the tile is row i of every array.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastpref {

// Element type of a logits / dz tile.  Accumulation is always fp32.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Divergence kinds (same ints as fastpref.backends.torch_backend).
constexpr int kForwardKl = 0;
constexpr int kReverseKl = 1;
constexpr int kJsd = 2;

// Floats of running per-row state carried between vocabulary slices (only when the
// vocabulary is split into several tiles; unused when first_tile && last_tile).
constexpr int kLogprobsStateWidth = 4;    // max, sum exp, sum exp*z, target logit
constexpr int kDivergenceStateWidth = 8;  // (max, sum, cross) student, (max, sum, cross) teacher, kl_t, kl_s

// z = (u + bias[j]) / temperature, then softcap * tanh(z / softcap) when softcap > 0.
struct LogitsTransform {
  const float* bias;      // [cols] fp32, already sliced to the tile's columns; nullptr: no bias
  float inv_temperature;  // 1 / temperature
  float softcap;          // <= 0: no softcap
};

struct LogprobsFwdParams {
  const void* logits;  // [rows x cols] raw GEMM output, row stride logits_row_stride, unit column stride
  DType logits_dtype;
  int64_t logits_row_stride;
  int64_t rows;
  int32_t cols;
  int64_t col0;   // vocabulary index of the tile's first column
  int64_t vocab;  // full vocabulary size V (labels outside [0, V) give NaN)
  LogitsTransform tf;
  const int64_t* labels;  // [rows]
  int64_t ignore_index;
  float* state;    // [rows x kLogprobsStateWidth]; nullptr when first_tile && last_tile
  float* logp;     // [rows]  written on the last tile
  float* entropy;  // [rows]  nullptr: not requested (its accumulator is then skipped)
  float* lse;      // [rows]
  bool first_tile;
  bool last_tile;
};

struct LogprobsGradParams {
  const void* logits;  // [rows x cols] raw GEMM output (may be the same memory as dz)
  DType logits_dtype;
  int64_t logits_row_stride;
  void* dz;  // [rows x cols] d loss / d (hidden @ W.T), written; may alias logits (in place)
  DType dz_dtype;
  int64_t dz_row_stride;
  int64_t rows;
  int32_t cols;
  int64_t col0;
  int64_t vocab;
  LogitsTransform tf;
  const int64_t* labels;  // [rows]
  int64_t ignore_index;
  const float* grad_logp;     // [rows]
  const float* grad_entropy;  // [rows] or nullptr
  const float* lse;           // [rows] from the forward
  const float* entropy;       // [rows] from the forward; required when grad_entropy is given
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
  const int64_t* labels;  // [rows] or nullptr (rows with labels == ignore_index give div 0)
  int64_t ignore_index;
  int32_t kind;  // kForwardKl / kReverseKl / kJsd
  float beta;    // JSD mixture weight of the teacher
  float log_beta;
  float log_one_minus_beta;
  int32_t pass;  // 0: log-sum-exps (+ the KL cross term); 1 (JSD only): KL(pt||m), KL(ps||m)
  float* state;  // [rows x kDivergenceStateWidth]; nullptr when first_tile && last_tile
  float* div;    // [rows]
  float* stats;  // [rows x 3] (lse_s, lse_t, aux), contiguous
  bool first_tile;
  bool last_tile;
};

struct DivergenceGradParams {
  const void* s_logits;  // student tile (may be the same memory as dz)
  const void* t_logits;  // teacher tile, read only
  DType logits_dtype;
  int64_t s_row_stride;
  int64_t t_row_stride;
  void* dz;  // [rows x cols] d loss / d (student hidden @ W.T); may alias s_logits
  DType dz_dtype;
  int64_t dz_row_stride;
  int64_t rows;
  int32_t cols;
  LogitsTransform s_tf;
  LogitsTransform t_tf;
  const int64_t* labels;  // [rows] or nullptr
  int64_t ignore_index;
  int32_t kind;
  float beta;
  float log_beta;
  float log_one_minus_beta;
  const float* grad;   // [rows] upstream gradient of div
  const float* stats;  // [rows x 3] from the forward
};

// Launch wrappers (epilogue.cu).  They return cudaGetLastError() after the launch, or
// cudaErrorInvalidValue for a dtype pair that has no instantiation.
cudaError_t run_logprobs_fwd(const LogprobsFwdParams& params, cudaStream_t stream);
cudaError_t run_logprobs_grad(const LogprobsGradParams& params, cudaStream_t stream);
cudaError_t run_divergence_fwd(const DivergenceFwdParams& params, cudaStream_t stream);
cudaError_t run_divergence_grad(const DivergenceGradParams& params, cudaStream_t stream);

}  // namespace fastpref
