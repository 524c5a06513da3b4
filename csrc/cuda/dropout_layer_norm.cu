// Launchers of the dropout + residual + LayerNorm kernels (torch-free: see launchers.h).
#include "../kernels/dropout_layer_norm.cuh"
#include "../kernels/dropout_layer_norm_tiled.cuh"
#include "dispatch.cuh"

namespace convbert_fast {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The 16-byte vectors per lane the tiled kernels need for a row of C (1 to 4: C <= 1024 in fp16/bf16, 512 in fp32;
// more would not fit in registers), or 0 when they do not apply: v1 chosen, C not a whole number of vectors or
// over 4 per lane, or a pointer not aligned.
int vectors_per_lane(DType dtype, int64_t channels, std::initializer_list<const void*> pointers) {
  const int64_t element = dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2, vec = 16 / element;
  if (cuda_kernel_choice() != KernelChoice::kV2 || !vectors_aligned(vec, element, pointers, {channels})) return 0;
  const int64_t needed = ceil_div(channels, 32 * vec);
  return needed <= 4 ? static_cast<int>(needed) : 0;
}

#define CONVBERT_FAST_WITH_VECTORS(NV_VALUE, NV, ...) \
  switch (NV_VALUE) {                                 \
    case 1: { constexpr int NV = 1; __VA_ARGS__; } break; \
    case 2: { constexpr int NV = 2; __VA_ARGS__; } break; \
    case 3: { constexpr int NV = 3; __VA_ARGS__; } break; \
    default: { constexpr int NV = 4; __VA_ARGS__; } break; \
  }

template <typename T>
void launch_forward_tiled(int nv, const void* x, const void* residual, const void* weight, const void* bias, void* out,
                          void* mean, void* rstd, int64_t rows, int64_t channels, uint64_t seed, double p, double eps,
                          cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const A scale = p < 1.0 ? static_cast<A>(1.0 / (1.0 - p)) : A(0);
  const uint32_t threshold = dropout_threshold(p);
  const unsigned blocks = static_cast<unsigned>(ceil_div(rows, kNormWarps * kNormForwardRows));
  CONVBERT_FAST_WITH_VECTORS(nv, NV,
    // without dropout (p = 0: eval, or a caller's choice) the instantiation that computes no hash
    const auto kernel = threshold == 0 ? dropout_add_layer_norm_forward_tiled_kernel<T, NV, false>
                                       : dropout_add_layer_norm_forward_tiled_kernel<T, NV, true>;
    kernel<<<blocks, kNormWarps * 32, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
        static_cast<const T*>(bias), static_cast<T*>(out), static_cast<A*>(mean), static_cast<A*>(rstd), rows,
        static_cast<int>(channels), seed, threshold, scale, static_cast<A>(eps)))
}

template <typename T>
void launch_backward_tiled(int nv, const void* grad, const void* x, const void* residual, const void* weight,
                           const void* mean, const void* rstd, void* grad_x, void* grad_residual,
                           void* weight_partials, void* bias_partials, int64_t rows, int64_t channels, uint64_t seed,
                           double p, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const A scale = p < 1.0 ? static_cast<A>(1.0 / (1.0 - p)) : A(0);
  const uint32_t threshold = dropout_threshold(p);
  const unsigned blocks = static_cast<unsigned>(ceil_div(rows, kNormWarps * kNormBackwardRows));
  CONVBERT_FAST_WITH_VECTORS(nv, NV,
    const auto kernel = threshold == 0 ? dropout_add_layer_norm_backward_tiled_kernel<T, NV, false>
                                       : dropout_add_layer_norm_backward_tiled_kernel<T, NV, true>;
    kernel<<<blocks, kNormWarps * 32, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(residual),
        static_cast<const T*>(weight), static_cast<const A*>(mean), static_cast<const A*>(rstd),
        static_cast<T*>(grad_x), static_cast<T*>(grad_residual), static_cast<A*>(weight_partials),
        static_cast<A*>(bias_partials), rows, static_cast<int>(channels), seed, threshold, scale))
}

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
  if (const int nv = vectors_per_lane(dtype, channels, {x, residual, weight, bias, out}); nv > 0) {
    CONVBERT_FAST_DISPATCH(dtype, launch_forward_tiled, nv, x, residual, weight, bias, out, mean, rstd, rows, channels,
                           seed, p, eps, stream);
    return cudaGetLastError();
  }
  if (rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // one block per row (grid.x)
  CONVBERT_FAST_DISPATCH(dtype, launch_forward, x, residual, weight, bias, out, mean, rstd, rows, channels, seed, p, eps,
                         stream);
  return cudaGetLastError();
}

NormPartials dropout_add_layer_norm_backward_partials(DType dtype, const void* grad, const void* x,
                                                      const void* residual, const void* weight, const void* grad_x,
                                                      const void* grad_residual, int64_t rows, int64_t channels) {
  if (vectors_per_lane(dtype, channels, {grad, x, residual, weight, grad_x, grad_residual}) > 0) {
    const int64_t blocks = ceil_div(rows, kNormWarps * kNormBackwardRows);
    return {blocks, blocks};
  }
  return {rows, 0};
}

cudaError_t dropout_add_layer_norm_backward(DType dtype, const void* grad, const void* x, const void* residual,
                                            const void* weight, const void* mean, const void* rstd, void* grad_x,
                                            void* grad_residual, void* weight_partials, void* bias_partials,
                                            int64_t rows, int64_t channels, uint64_t seed, double p,
                                            cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (const int nv = vectors_per_lane(dtype, channels, {grad, x, residual, weight, grad_x, grad_residual}); nv > 0) {
    CONVBERT_FAST_DISPATCH(dtype, launch_backward_tiled, nv, grad, x, residual, weight, mean, rstd, grad_x,
                           grad_residual, weight_partials, bias_partials, rows, channels, seed, p, stream);
    return cudaGetLastError();
  }
  if (rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  CONVBERT_FAST_DISPATCH(dtype, launch_backward, grad, x, residual, weight, mean, rstd, grad_x, grad_residual,
                         weight_partials, rows, channels, seed, p, stream);
  return cudaGetLastError();
}

}  // namespace convbert_fast
