// fastpref_api.cpp: torch host code of the CUDA backend: the `fastpref_cuda::` ops.
// Python (fastpref/backends/cuda_ops.py) runs the cuBLAS GEMMs (torch.mm) into a bounded
// workspace tile; each op here checks that tile and its per-row arrays (shape, dtype, device,
// contiguity), fills a plain params struct and launches one fused epilogue kernel
// (epilogue.cu) on the current stream.  Outputs are written in place into caller-owned
// tensors (row-sliced views), so chunking never copies; the ops return nothing.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "fastpref_params.h"

namespace fastpref {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType tile_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// A [rows x cols] tile: CUDA, unit column stride, row stride >= cols.
void check_tile(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D [rows x cols] tile, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= (1 << 30), name, ": expected 1 <= cols <= 2^30, got ", t.size(1));
  TORCH_CHECK(t.size(0) <= 2147483647LL, name, ": expected at most 2^31 - 1 rows, got ", t.size(0));
  TORCH_CHECK(t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1)), name,
              ": expected unit column stride and row stride >= cols, got strides ", t.strides());
  tile_dtype(t, name);
}

void check_same_tile(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_tile(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (that of ", ref_name, "), got ",
              t.sizes());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (that of ", ref_name, "), got ",
              t.device());
}

// A contiguous per-row array of `rows` x `width` elements (width 0: 1-D of length rows).
void check_rows(const Tensor& t, const char* name, const Tensor& tile, at::ScalarType dtype, int64_t width = 0) {
  TORCH_CHECK(t.device() == tile.device(), name, ": expected device ", tile.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  if (width == 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == tile.size(0), name, ": expected shape [", tile.size(0), "], got ",
                t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == tile.size(0) && t.size(1) == width, name, ": expected shape [",
                tile.size(0), ", ", width, "], got ", t.sizes());
  }
}

LogitsTransform make_transform(const OptTensor& bias, const char* name, const Tensor& tile, double temperature,
                               double softcap) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature: expected a finite value > 0, got ",
              temperature);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap: expected a finite value >= 0 (0: off), got ",
              softcap);
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    const Tensor& b = *bias;
    TORCH_CHECK(b.device() == tile.device(), name, ": expected device ", tile.device(), ", got ", b.device());
    TORCH_CHECK(b.scalar_type() == at::kFloat, name, ": expected float32 (the host casts it once), got ",
                b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == tile.size(1) && b.is_contiguous(), name,
                ": expected a contiguous [cols] = [", tile.size(1), "] slice, got shape ", b.sizes());
    bias_ptr = b.const_data_ptr<float>();
  }
  return LogitsTransform{bias_ptr, static_cast<float>(1.0 / temperature), static_cast<float>(softcap)};
}

// The state buffer carried between vocabulary slices; nullptr when the row fits one tile.
float* state_ptr(const Tensor& state, const Tensor& tile, int64_t width, bool first_tile, bool last_tile) {
  if (first_tile && last_tile) return nullptr;
  check_rows(state, "state", tile, at::kFloat, width);
  return state.mutable_data_ptr<float>();
}

void check_kind(int64_t kind, double beta) {
  TORCH_CHECK(kind == kForwardKl || kind == kReverseKl || kind == kJsd,
              "kind: expected 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ", kind);
  TORCH_CHECK(kind != kJsd || (beta > 0 && beta < 1), "beta: expected 0 < beta < 1 for jsd, got ", beta);
}

// The stream torch is using on the current device (set by the CUDAGuard of each op).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastpref_cuda::", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// ------------------------------------------------------------------ ops

void logprobs_stats_fwd(const Tensor& logits, const Tensor& labels, const OptTensor& bias, const Tensor& state,
                        const Tensor& logp, const Tensor& entropy, const Tensor& lse, int64_t col0, int64_t vocab,
                        int64_t ignore_index, double temperature, double softcap, bool first_tile, bool last_tile) {
  check_tile(logits, "logits");
  check_rows(labels, "labels", logits, at::kLong);
  check_rows(logp, "logp", logits, at::kFloat);
  check_rows(lse, "lse", logits, at::kFloat);
  const bool with_entropy = entropy.numel() > 0;  // an empty tensor: entropy not requested
  if (with_entropy) check_rows(entropy, "entropy", logits, at::kFloat);
  TORCH_CHECK(col0 >= 0 && col0 + logits.size(1) <= vocab, "col0: expected the tile's columns inside [0, ", vocab,
              "), got col0=", col0, " and ", logits.size(1), " columns");
  const c10::cuda::CUDAGuard guard(logits.device());

  LogprobsFwdParams p{};
  p.logits = logits.const_data_ptr();
  p.logits_dtype = tile_dtype(logits, "logits");
  p.logits_row_stride = logits.stride(0);
  p.rows = logits.size(0);
  p.cols = static_cast<int32_t>(logits.size(1));
  p.col0 = col0;
  p.vocab = vocab;
  p.tf = make_transform(bias, "bias", logits, temperature, softcap);
  p.labels = labels.const_data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.state = state_ptr(state, logits, kLogprobsStateWidth, first_tile, last_tile);
  p.logp = logp.mutable_data_ptr<float>();
  p.entropy = with_entropy ? entropy.mutable_data_ptr<float>() : nullptr;
  p.lse = lse.mutable_data_ptr<float>();
  p.first_tile = first_tile;
  p.last_tile = last_tile;
  check_launch(run_logprobs_fwd(p, current_stream()), "logprobs_stats_fwd");
}

void logprobs_grad_tile(const Tensor& logits, const OptTensor& dz_out, const Tensor& labels, const OptTensor& bias,
                        const Tensor& grad_logp, const OptTensor& grad_entropy, const Tensor& lse,
                        const OptTensor& entropy, int64_t col0, int64_t vocab, int64_t ignore_index,
                        double temperature, double softcap) {
  check_tile(logits, "logits");
  const Tensor& dz = dz_out.has_value() ? *dz_out : logits;
  if (dz_out.has_value()) {
    check_same_tile(dz, "dz_out", logits, "logits");
    TORCH_CHECK(dz.scalar_type() == logits.scalar_type() || logits.scalar_type() == at::kFloat,
                "dz_out: expected the dtype of logits, or float16/bfloat16 from a float32 tile; got ",
                dz.scalar_type(), " from ", logits.scalar_type());
  }
  check_rows(labels, "labels", logits, at::kLong);
  check_rows(grad_logp, "grad_logp", logits, at::kFloat);
  check_rows(lse, "lse", logits, at::kFloat);
  if (grad_entropy.has_value()) {
    check_rows(*grad_entropy, "grad_entropy", logits, at::kFloat);
    TORCH_CHECK(entropy.has_value(), "entropy: required when grad_entropy is given");
    check_rows(*entropy, "entropy", logits, at::kFloat);
  }
  TORCH_CHECK(col0 >= 0 && col0 + logits.size(1) <= vocab, "col0: expected the tile's columns inside [0, ", vocab,
              "), got col0=", col0, " and ", logits.size(1), " columns");
  const c10::cuda::CUDAGuard guard(logits.device());

  LogprobsGradParams p{};
  p.logits = logits.const_data_ptr();
  p.logits_dtype = tile_dtype(logits, "logits");
  p.logits_row_stride = logits.stride(0);
  p.dz = dz.mutable_data_ptr();
  p.dz_dtype = tile_dtype(dz, "dz_out");
  p.dz_row_stride = dz.stride(0);
  p.rows = logits.size(0);
  p.cols = static_cast<int32_t>(logits.size(1));
  p.col0 = col0;
  p.vocab = vocab;
  p.tf = make_transform(bias, "bias", logits, temperature, softcap);
  p.labels = labels.const_data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.grad_logp = grad_logp.const_data_ptr<float>();
  p.grad_entropy = grad_entropy.has_value() ? grad_entropy->const_data_ptr<float>() : nullptr;
  p.lse = lse.const_data_ptr<float>();
  p.entropy = grad_entropy.has_value() ? entropy->const_data_ptr<float>() : nullptr;
  check_launch(run_logprobs_grad(p, current_stream()), "logprobs_grad_tile");
}

void divergence_stats_fwd(const Tensor& s_logits, const Tensor& t_logits, const OptTensor& labels,
                          const OptTensor& s_bias, const OptTensor& t_bias, const Tensor& state, const Tensor& div,
                          const Tensor& stats, int64_t ignore_index, int64_t kind, double beta, double temperature,
                          double s_softcap, double t_softcap, int64_t pass, bool first_tile, bool last_tile) {
  check_tile(s_logits, "s_logits");
  check_same_tile(t_logits, "t_logits", s_logits, "s_logits");
  TORCH_CHECK(t_logits.scalar_type() == s_logits.scalar_type(), "t_logits: expected dtype ", s_logits.scalar_type(),
              " (that of s_logits), got ", t_logits.scalar_type());
  if (labels.has_value()) check_rows(*labels, "labels", s_logits, at::kLong);
  check_rows(div, "div", s_logits, at::kFloat);
  check_rows(stats, "stats", s_logits, at::kFloat, 3);
  check_kind(kind, beta);
  TORCH_CHECK(pass == 0 || (pass == 1 && kind == kJsd), "pass: expected 0, or 1 for jsd, got ", pass);
  const c10::cuda::CUDAGuard guard(s_logits.device());

  DivergenceFwdParams p{};
  p.s_logits = s_logits.const_data_ptr();
  p.t_logits = t_logits.const_data_ptr();
  p.logits_dtype = tile_dtype(s_logits, "s_logits");
  p.s_row_stride = s_logits.stride(0);
  p.t_row_stride = t_logits.stride(0);
  p.rows = s_logits.size(0);
  p.cols = static_cast<int32_t>(s_logits.size(1));
  p.s_tf = make_transform(s_bias, "s_bias", s_logits, temperature, s_softcap);
  p.t_tf = make_transform(t_bias, "t_bias", s_logits, temperature, t_softcap);
  p.labels = labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr;
  p.ignore_index = ignore_index;
  p.kind = static_cast<int32_t>(kind);
  p.beta = static_cast<float>(beta);
  p.log_beta = static_cast<float>(std::log(beta));
  p.log_one_minus_beta = static_cast<float>(std::log1p(-beta));
  p.pass = static_cast<int32_t>(pass);
  p.state = state_ptr(state, s_logits, kDivergenceStateWidth, first_tile, last_tile);
  p.div = div.mutable_data_ptr<float>();
  p.stats = stats.mutable_data_ptr<float>();
  p.first_tile = first_tile;
  p.last_tile = last_tile;
  check_launch(run_divergence_fwd(p, current_stream()), "divergence_stats_fwd");
}

void divergence_grad_tile(const Tensor& s_logits, const OptTensor& dz_out, const Tensor& t_logits,
                          const OptTensor& labels, const OptTensor& s_bias, const OptTensor& t_bias,
                          const Tensor& grad, const Tensor& stats, int64_t ignore_index, int64_t kind, double beta,
                          double temperature, double s_softcap, double t_softcap) {
  check_tile(s_logits, "s_logits");
  check_same_tile(t_logits, "t_logits", s_logits, "s_logits");
  TORCH_CHECK(t_logits.scalar_type() == s_logits.scalar_type(), "t_logits: expected dtype ", s_logits.scalar_type(),
              " (that of s_logits), got ", t_logits.scalar_type());
  const Tensor& dz = dz_out.has_value() ? *dz_out : s_logits;
  if (dz_out.has_value()) {
    check_same_tile(dz, "dz_out", s_logits, "s_logits");
    TORCH_CHECK(dz.scalar_type() == s_logits.scalar_type() || s_logits.scalar_type() == at::kFloat,
                "dz_out: expected the dtype of s_logits, or float16/bfloat16 from a float32 tile; got ",
                dz.scalar_type(), " from ", s_logits.scalar_type());
  }
  if (labels.has_value()) check_rows(*labels, "labels", s_logits, at::kLong);
  check_rows(grad, "grad", s_logits, at::kFloat);
  check_rows(stats, "stats", s_logits, at::kFloat, 3);
  check_kind(kind, beta);
  const c10::cuda::CUDAGuard guard(s_logits.device());

  DivergenceGradParams p{};
  p.s_logits = s_logits.const_data_ptr();
  p.t_logits = t_logits.const_data_ptr();
  p.logits_dtype = tile_dtype(s_logits, "s_logits");
  p.s_row_stride = s_logits.stride(0);
  p.t_row_stride = t_logits.stride(0);
  p.dz = dz.mutable_data_ptr();
  p.dz_dtype = tile_dtype(dz, "dz_out");
  p.dz_row_stride = dz.stride(0);
  p.rows = s_logits.size(0);
  p.cols = static_cast<int32_t>(s_logits.size(1));
  p.s_tf = make_transform(s_bias, "s_bias", s_logits, temperature, s_softcap);
  p.t_tf = make_transform(t_bias, "t_bias", s_logits, temperature, t_softcap);
  p.labels = labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr;
  p.ignore_index = ignore_index;
  p.kind = static_cast<int32_t>(kind);
  p.beta = static_cast<float>(beta);
  p.log_beta = static_cast<float>(std::log(beta));
  p.log_one_minus_beta = static_cast<float>(std::log1p(-beta));
  p.grad = grad.const_data_ptr<float>();
  p.stats = stats.const_data_ptr<float>();
  check_launch(run_divergence_grad(p, current_stream()), "divergence_grad_tile");
}

}  // namespace
}  // namespace fastpref

// Schemas: every op writes into caller-owned tensors, marked (a!) ... so functionalization,
// torch.compile and opcheck see the mutation.  `softcap` 0.0 means "no softcap".  The fake
// (meta) kernels are registered from Python after the library is loaded (cuda_ops.py).
TORCH_LIBRARY(fastpref_cuda, m) {
  m.def(
      "logprobs_stats_fwd(Tensor logits, Tensor labels, Tensor? bias, Tensor(a!) state, Tensor(b!) logp, "
      "Tensor(c!) entropy, Tensor(d!) lse, int col0, int vocab, int ignore_index, float temperature, "
      "float softcap, bool first_tile, bool last_tile) -> ()");
  m.def(
      "logprobs_grad_tile(Tensor(a!) logits, Tensor(b!)? dz_out, Tensor labels, Tensor? bias, Tensor grad_logp, "
      "Tensor? grad_entropy, Tensor lse, Tensor? entropy, int col0, int vocab, int ignore_index, "
      "float temperature, float softcap) -> ()");
  m.def(
      "divergence_stats_fwd(Tensor s_logits, Tensor t_logits, Tensor? labels, Tensor? s_bias, Tensor? t_bias, "
      "Tensor(a!) state, Tensor(b!) div, Tensor(c!) stats, int ignore_index, int kind, float beta, "
      "float temperature, float s_softcap, float t_softcap, int pass_, bool first_tile, bool last_tile) -> ()");
  m.def(
      "divergence_grad_tile(Tensor(a!) s_logits, Tensor(b!)? dz_out, Tensor t_logits, Tensor? labels, "
      "Tensor? s_bias, Tensor? t_bias, Tensor grad, Tensor stats, int ignore_index, int kind, float beta, "
      "float temperature, float s_softcap, float t_softcap) -> ()");
}

TORCH_LIBRARY_IMPL(fastpref_cuda, CUDA, m) {
  m.impl("logprobs_stats_fwd", &fastpref::logprobs_stats_fwd);
  m.impl("logprobs_grad_tile", &fastpref::logprobs_grad_tile);
  m.impl("divergence_stats_fwd", &fastpref::divergence_stats_fwd);
  m.impl("divergence_grad_tile", &fastpref::divergence_grad_tile);
}

// An empty Python module, so the ahead-of-time build (`import fastpref._C`, setup.py) can be
// imported; the JIT build loads the same library with torch.ops.load_library instead.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME fastpref_cuda
#endif
#define FASTPREF_CONCAT_(a, b) a##b
#define FASTPREF_CONCAT(a, b) FASTPREF_CONCAT_(a, b)
#define FASTPREF_STR_(a) #a
#define FASTPREF_STR(a) FASTPREF_STR_(a)

PyMODINIT_FUNC FASTPREF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, FASTPREF_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr, nullptr, nullptr, nullptr,
      nullptr};
  return PyModule_Create(&module_def);
}
