// fastpref_api.cpp: torch host code of the CUDA backend: the `fastpref_cuda::` ops.
// Python (fastpref/backends/cuda_ops.py) runs the cuBLAS GEMMs (torch.mm) into a bounded
// workspace tile (or the logits cache); each op here checks that tile and its per-row arrays
// (shape, dtype, device, strides), fills a plain params struct and launches one fused epilogue
// kernel (epilogue.cu) on the current stream.  Outputs are written in place into caller-owned
// tensors (row-sliced views of the statistics planes, dz tiles), so chunking never copies; the
// ops return nothing.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

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

LogitsTransform make_transform(const OptTensor& bias, const char* name, const Tensor& tile, double inv_temp,
                               const std::optional<double>& cap, const char* inv_temp_name, const char* cap_name) {
  TORCH_CHECK(std::isfinite(inv_temp), inv_temp_name, ": expected a finite value (logit_scale / temperature), got ",
              inv_temp);
  TORCH_CHECK(!cap.has_value() || (std::isfinite(*cap) && *cap > 0), cap_name,
              ": expected None or a finite value > 0 (softcap / temperature), got ", cap.value_or(0.0));
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
  return LogitsTransform{bias_ptr, static_cast<float>(inv_temp), cap.has_value() ? static_cast<float>(*cap) : 0.f};
}

// Statistics planes [planes x rows] (a column slice of [planes x N]): unit row stride.
float* stats_ptr(const Tensor& stats, const Tensor& tile, int64_t planes) {
  TORCH_CHECK(stats.device() == tile.device(), "stats: expected device ", tile.device(), ", got ", stats.device());
  TORCH_CHECK(stats.scalar_type() == at::kFloat, "stats: expected float32, got ", stats.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == planes && stats.size(1) == tile.size(0), "stats: expected shape [",
              planes, ", ", tile.size(0), "], got ", stats.sizes());
  TORCH_CHECK(stats.size(1) <= 1 || stats.stride(1) == 1, "stats: expected a unit stride along the rows, got strides ",
              stats.strides());
  return stats.mutable_data_ptr<float>();
}

void check_kind(int64_t kind, double beta) {
  TORCH_CHECK(kind == kForwardKl || kind == kReverseKl || kind == kJsd,
              "kind: expected 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ", kind);
  TORCH_CHECK(kind != kJsd || (beta > 0 && beta < 1), "beta: expected 0 < beta < 1 for jsd, got ", beta);
}

// log(beta), log(1 - beta) of the JSD mixture (unused by the KL kinds, whose beta may be 0 or 1).
std::pair<float, float> log_mixture(int64_t kind, double beta) {
  if (kind != kJsd) return {0.f, 0.f};
  return {static_cast<float>(std::log(beta)), static_cast<float>(std::log1p(-beta))};
}

// The stream torch is using on the current device (set by the CUDAGuard of each op).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastpref_cuda::", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// A dz output: the logits tile itself (in place), or a tile of the same shape in the logits' dtype
// or in float16 / bfloat16 from a float32 tile (GEMM-ready dz).
const Tensor& dz_tile(const OptTensor& dz_out, const Tensor& logits, const char* logits_name) {
  if (!dz_out.has_value()) return logits;
  check_same_tile(*dz_out, "dz_out", logits, logits_name);
  TORCH_CHECK(dz_out->scalar_type() == logits.scalar_type() || logits.scalar_type() == at::kFloat,
              "dz_out: expected the dtype of ", logits_name, ", or float16/bfloat16 from a float32 tile; got ",
              dz_out->scalar_type(), " from ", logits.scalar_type());
  return *dz_out;
}

// ------------------------------------------------------------------ ops

void logprobs_stats_fwd(const Tensor& logits, const Tensor& labels, const OptTensor& bias, const Tensor& stats,
                        int64_t col0, double inv_temp, std::optional<double> cap, int64_t want) {
  check_tile(logits, "logits");
  check_rows(labels, "labels", logits, at::kLong);
  TORCH_CHECK(col0 >= 0, "col0: expected the global index (>= 0) of the tile's first column, got ", col0);
  TORCH_CHECK(want >= 0 && want <= (kWantEntropy | kWantSumSq | kWantZsum | kWantBefore),
              "want: expected a combination of the kWant* bits (0..15), got ", want);
  const c10::cuda::CUDAGuard guard(logits.device());

  LogprobsFwdParams p{};
  p.logits = logits.const_data_ptr();
  p.logits_dtype = tile_dtype(logits, "logits");
  p.logits_row_stride = logits.stride(0);
  p.rows = logits.size(0);
  p.cols = static_cast<int32_t>(logits.size(1));
  p.col0 = col0;
  p.tf = make_transform(bias, "bias", logits, inv_temp, cap, "inv_temp", "cap");
  p.labels = labels.const_data_ptr<int64_t>();
  p.want = static_cast<int32_t>(want);
  p.stats = stats_ptr(stats, logits, kLpPlanes);
  p.plane_stride = stats.stride(0);
  check_launch(run_logprobs_fwd(p, current_stream()), "logprobs_stats_fwd");
}

void logprobs_grad_tile(const Tensor& logits, const OptTensor& dz_out, const Tensor& labels, const OptTensor& bias,
                        const Tensor& grad_logp, const OptTensor& grad_entropy, const Tensor& lse,
                        const OptTensor& entropy, int64_t col0, double inv_temp, std::optional<double> cap) {
  check_tile(logits, "logits");
  const Tensor& dz = dz_tile(dz_out, logits, "logits");
  check_rows(labels, "labels", logits, at::kLong);
  check_rows(grad_logp, "grad_logp", logits, at::kFloat);
  check_rows(lse, "lse", logits, at::kFloat);
  if (grad_entropy.has_value()) {
    check_rows(*grad_entropy, "grad_entropy", logits, at::kFloat);
    TORCH_CHECK(entropy.has_value(), "entropy: required when grad_entropy is given");
    check_rows(*entropy, "entropy", logits, at::kFloat);
  }
  TORCH_CHECK(col0 >= 0, "col0: expected the global index (>= 0) of the tile's first column, got ", col0);
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
  p.tf = make_transform(bias, "bias", logits, inv_temp, cap, "inv_temp", "cap");
  p.labels = labels.const_data_ptr<int64_t>();
  p.grad_logp = grad_logp.const_data_ptr<float>();
  p.grad_entropy = grad_entropy.has_value() ? grad_entropy->const_data_ptr<float>() : nullptr;
  p.lse = lse.const_data_ptr<float>();
  p.entropy = grad_entropy.has_value() ? entropy->const_data_ptr<float>() : nullptr;
  check_launch(run_logprobs_grad(p, current_stream()), "logprobs_grad_tile");
}

void divergence_stats_fwd(const Tensor& s_logits, const Tensor& t_logits, const OptTensor& s_bias,
                          const OptTensor& t_bias, const Tensor& stats, const OptTensor& lse, int64_t kind,
                          int64_t pass, bool entropy, double beta, double s_inv_temp, std::optional<double> s_cap,
                          double t_inv_temp, std::optional<double> t_cap) {
  check_tile(s_logits, "s_logits");
  check_same_tile(t_logits, "t_logits", s_logits, "s_logits");
  TORCH_CHECK(t_logits.scalar_type() == s_logits.scalar_type(), "t_logits: expected dtype ", s_logits.scalar_type(),
              " (that of s_logits), got ", t_logits.scalar_type());
  check_kind(kind, beta);
  TORCH_CHECK(pass == 0 || (pass == 1 && kind == kJsd), "pass_: expected 0, or 1 for jsd, got ", pass);
  TORCH_CHECK(pass == 0 || lse.has_value(), "lse: required for pass 1 (the merged log-sum-exps)");
  if (pass == 1) check_rows(*lse, "lse", s_logits, at::kFloat, 2);
  const c10::cuda::CUDAGuard guard(s_logits.device());

  DivergenceFwdParams p{};
  p.s_logits = s_logits.const_data_ptr();
  p.t_logits = t_logits.const_data_ptr();
  p.logits_dtype = tile_dtype(s_logits, "s_logits");
  p.s_row_stride = s_logits.stride(0);
  p.t_row_stride = t_logits.stride(0);
  p.rows = s_logits.size(0);
  p.cols = static_cast<int32_t>(s_logits.size(1));
  p.s_tf = make_transform(s_bias, "s_bias", s_logits, s_inv_temp, s_cap, "s_inv_temp", "s_cap");
  p.t_tf = make_transform(t_bias, "t_bias", s_logits, t_inv_temp, t_cap, "t_inv_temp", "t_cap");
  p.kind = static_cast<int32_t>(kind);
  p.pass = static_cast<int32_t>(pass);
  p.want_entropy = entropy;
  std::tie(p.log_beta, p.log_one_minus_beta) = log_mixture(kind, beta);
  p.lse = pass == 1 ? lse->const_data_ptr<float>() : nullptr;
  p.stats = stats_ptr(stats, s_logits, kDvPlanes);
  p.plane_stride = stats.stride(0);
  check_launch(run_divergence_fwd(p, current_stream()), "divergence_stats_fwd");
}

void divergence_grad_tile(const Tensor& s_logits, const OptTensor& dz_out, const Tensor& t_logits,
                          const OptTensor& s_bias, const OptTensor& t_bias, const Tensor& grad, const Tensor& saved,
                          int64_t kind, double beta, double s_inv_temp, std::optional<double> s_cap,
                          double t_inv_temp, std::optional<double> t_cap) {
  check_tile(s_logits, "s_logits");
  check_same_tile(t_logits, "t_logits", s_logits, "s_logits");
  TORCH_CHECK(t_logits.scalar_type() == s_logits.scalar_type(), "t_logits: expected dtype ", s_logits.scalar_type(),
              " (that of s_logits), got ", t_logits.scalar_type());
  const Tensor& dz = dz_tile(dz_out, s_logits, "s_logits");
  check_rows(grad, "grad", s_logits, at::kFloat);
  check_rows(saved, "saved", s_logits, at::kFloat, 3);
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
  p.s_tf = make_transform(s_bias, "s_bias", s_logits, s_inv_temp, s_cap, "s_inv_temp", "s_cap");
  p.t_tf = make_transform(t_bias, "t_bias", s_logits, t_inv_temp, t_cap, "t_inv_temp", "t_cap");
  p.kind = static_cast<int32_t>(kind);
  p.one_minus_beta = static_cast<float>(1.0 - beta);
  std::tie(p.log_beta, p.log_one_minus_beta) = log_mixture(kind, beta);
  p.grad = grad.const_data_ptr<float>();
  p.saved = saved.const_data_ptr<float>();
  check_launch(run_divergence_grad(p, current_stream()), "divergence_grad_tile");
}

}  // namespace
}  // namespace fastpref

// Schemas: every op writes into caller-owned tensors, marked (a!) ... so functionalization,
// torch.compile and opcheck see the mutation (a grad op writes dz into its logits tile when
// dz_out is None, into dz_out otherwise).  A cap of None means "no softcap".  The fake (meta)
// kernels are registered from Python after the library is loaded (cuda_build.py).
TORCH_LIBRARY(fastpref_cuda, m) {
  m.def(
      "logprobs_stats_fwd(Tensor logits, Tensor labels, Tensor? bias, Tensor(a!) stats, int col0, float inv_temp, "
      "float? cap, int want) -> ()");
  m.def(
      "logprobs_grad_tile(Tensor(a!) logits, Tensor(b!)? dz_out, Tensor labels, Tensor? bias, Tensor grad_logp, "
      "Tensor? grad_entropy, Tensor lse, Tensor? entropy, int col0, float inv_temp, float? cap) -> ()");
  m.def(
      "divergence_stats_fwd(Tensor s_logits, Tensor t_logits, Tensor? s_bias, Tensor? t_bias, Tensor(a!) stats, "
      "Tensor? lse, int kind, int pass_, bool entropy, float beta, float s_inv_temp, float? s_cap, "
      "float t_inv_temp, float? t_cap) -> ()");
  m.def(
      "divergence_grad_tile(Tensor(a!) s_logits, Tensor(b!)? dz_out, Tensor t_logits, Tensor? s_bias, "
      "Tensor? t_bias, Tensor grad, Tensor saved, int kind, float beta, float s_inv_temp, float? s_cap, "
      "float t_inv_temp, float? t_cap) -> ()");
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
