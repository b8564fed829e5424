// epilogue.cu: explicit instantiations and launch wrappers of the fused logits epilogues.
// No torch headers, so CI compiles it with a bare `nvcc -c` on machines without a GPU.
// One block of kThreads per tile row (grid = rows); the vector width is 16 bytes of the widest
// element type a kernel touches.  Supported tiles: fp32 / fp16 / bf16 logits, and dz either
// in the logits' dtype (in place) or fp16 / bf16 from an fp32 logits tile (GEMM-ready dz).
#include "epilogue.cuh"

namespace fastpref {
namespace {

using epilogue::kThreads;

template <typename A, typename B>
constexpr int vec_width() {
  return 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
}

bool bad_shape(int64_t rows, int32_t cols) {
  // gridDim.x <= 2^31 - 1; column indices are int
  return rows < 0 || rows > 2147483647LL || cols <= 0;
}

template <typename Tz>
cudaError_t launch_logprobs_fwd(const LogprobsFwdParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_width<Tz, Tz>();
  epilogue::logprobs_fwd_kernel<Tz, kVec><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Tz, typename Tdz>
cudaError_t launch_logprobs_grad(const LogprobsGradParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_width<Tz, Tdz>();
  epilogue::logprobs_grad_kernel<Tz, Tdz, kVec><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Tz>
cudaError_t launch_divergence_fwd(const DivergenceFwdParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_width<Tz, Tz>();
  epilogue::divergence_fwd_kernel<Tz, kVec><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Tz, typename Tdz>
cudaError_t launch_divergence_grad(const DivergenceGradParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_width<Tz, Tdz>();
  epilogue::divergence_grad_kernel<Tz, Tdz, kVec><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// (logits dtype, dz dtype) -> a launcher taking (params, stream); the five supported pairs.
template <template <typename, typename> class Launch, typename Params>
cudaError_t dispatch_grad(DType z, DType dz, const Params& p, cudaStream_t stream) {
  if (z == dz) {
    switch (z) {
      case DType::kFloat32: return Launch<float, float>::run(p, stream);
      case DType::kFloat16: return Launch<__half, __half>::run(p, stream);
      case DType::kBFloat16: return Launch<__nv_bfloat16, __nv_bfloat16>::run(p, stream);
    }
  } else if (z == DType::kFloat32) {
    switch (dz) {
      case DType::kFloat16: return Launch<float, __half>::run(p, stream);
      case DType::kBFloat16: return Launch<float, __nv_bfloat16>::run(p, stream);
      default: break;
    }
  }
  return cudaErrorInvalidValue;
}

template <typename Tz, typename Tdz>
struct LogprobsGradLaunch {
  static cudaError_t run(const LogprobsGradParams& p, cudaStream_t s) { return launch_logprobs_grad<Tz, Tdz>(p, s); }
};

template <typename Tz, typename Tdz>
struct DivergenceGradLaunch {
  static cudaError_t run(const DivergenceGradParams& p, cudaStream_t s) { return launch_divergence_grad<Tz, Tdz>(p, s); }
};

}  // namespace

cudaError_t run_logprobs_fwd(const LogprobsFwdParams& p, cudaStream_t stream) {
  if (bad_shape(p.rows, p.cols)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  switch (p.logits_dtype) {
    case DType::kFloat32: return launch_logprobs_fwd<float>(p, stream);
    case DType::kFloat16: return launch_logprobs_fwd<__half>(p, stream);
    case DType::kBFloat16: return launch_logprobs_fwd<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_logprobs_grad(const LogprobsGradParams& p, cudaStream_t stream) {
  if (bad_shape(p.rows, p.cols)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  return dispatch_grad<LogprobsGradLaunch>(p.logits_dtype, p.dz_dtype, p, stream);
}

cudaError_t run_divergence_fwd(const DivergenceFwdParams& p, cudaStream_t stream) {
  if (bad_shape(p.rows, p.cols) || p.pass < 0 || p.pass > 1 || (p.pass == 1 && p.lse == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  switch (p.logits_dtype) {
    case DType::kFloat32: return launch_divergence_fwd<float>(p, stream);
    case DType::kFloat16: return launch_divergence_fwd<__half>(p, stream);
    case DType::kBFloat16: return launch_divergence_fwd<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_divergence_grad(const DivergenceGradParams& p, cudaStream_t stream) {
  if (bad_shape(p.rows, p.cols)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  return dispatch_grad<DivergenceGradLaunch>(p.logits_dtype, p.dz_dtype, p, stream);
}

}  // namespace fastpref
