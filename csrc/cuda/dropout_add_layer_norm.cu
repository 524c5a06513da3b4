// Launchers of the dropout + residual + LayerNorm kernels (torch-free: see launchers.h).
#include "../kernels/dropout_layer_norm.cuh"
#include "dispatch.cuh"

namespace convbert_fast {
namespace {

template <typename T>
void launch_forward(const void* x, const void* residual, const void* weight, const void* bias, void* out, void* mean,
                    void* rstd, int64_t rows, int64_t channels, uint64_t seed, double p, double eps,
                    cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const A scale = p < 1.0 ? static_cast<A>(1.0 / (1.0 - p)) : A(0);
  dropout_add_layer_norm_forward_kernel<T><<<static_cast<unsigned>(rows), kLayerNormThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
      static_cast<const T*>(bias), static_cast<T*>(out), static_cast<A*>(mean), static_cast<A*>(rstd), channels, seed,
      dropout_threshold(p), scale, static_cast<A>(eps));
}

template <typename T>
void launch_backward(const void* grad, const void* x, const void* residual, const void* weight, const void* mean,
                     const void* rstd, void* grad_x, void* grad_residual, void* grad_times_xhat, int64_t rows,
                     int64_t channels, uint64_t seed, double p, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const A scale = p < 1.0 ? static_cast<A>(1.0 / (1.0 - p)) : A(0);
  dropout_add_layer_norm_backward_kernel<T><<<static_cast<unsigned>(rows), kLayerNormThreads, 0, stream>>>(
      static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(residual),
      static_cast<const T*>(weight), static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<T*>(grad_x),
      static_cast<T*>(grad_residual), static_cast<A*>(grad_times_xhat), channels, seed, dropout_threshold(p), scale);
}

}  // namespace

cudaError_t dropout_add_layer_norm_forward(DType dtype, const void* x, const void* residual, const void* weight,
                                           const void* bias, void* out, void* mean, void* rstd, int64_t rows,
                                           int64_t channels, uint64_t seed, double p, double eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // one block per row (grid.x)
  CONVBERT_FAST_DISPATCH(dtype, launch_forward, x, residual, weight, bias, out, mean, rstd, rows, channels, seed, p, eps,
                         stream);
  return cudaGetLastError();
}

cudaError_t dropout_add_layer_norm_backward(DType dtype, const void* grad, const void* x, const void* residual,
                                            const void* weight, const void* mean, const void* rstd, void* grad_x,
                                            void* grad_residual, void* grad_times_xhat, int64_t rows, int64_t channels,
                                            uint64_t seed, double p, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  CONVBERT_FAST_DISPATCH(dtype, launch_backward, grad, x, residual, weight, mean, rstd, grad_x, grad_residual,
                         grad_times_xhat, rows, channels, seed, p, stream);
  return cudaGetLastError();
}

}  // namespace convbert_fast
