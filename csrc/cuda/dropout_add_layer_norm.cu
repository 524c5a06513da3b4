// LayerNorm(dropout(x) + residual), forward and backward: one block per row of C channels, h = dropout(x) +
// residual recomputed in each pass (the mask from (seed, index), see dropout_mask.h) instead of kept.
// The kernels, then their launchers (torch-free: see launchers.h).
#include <cstdint>

#include "../dropout_mask.h"
#include "common.cuh"
#include "dispatch.cuh"

namespace convbert_fast {

constexpr int kLayerNormThreads = 256;

// The sum over the block, returned to every thread; `shared` holds 33 values and is free again on return.
template <typename A>
__device__ __forceinline__ A block_sum(A value, A* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  value = warp_sum(value);
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = warp_sum(lane < warps ? shared[lane] : A(0));
    if (lane == 0) shared[32] = value;
  }
  __syncthreads();
  value = shared[32];
  __syncthreads();
  return value;
}

template <typename T, typename A>
__device__ __forceinline__ A dropped_sum(const T* x, const T* residual, int64_t index, uint64_t seed,
                                         uint32_t threshold, A scale) {
  // a multiply, as eager dropout and the CPU kernel: a dropped NaN or inf still gives NaN (inf * 0)
  const A kept = to_acc(x[index]) * (dropout_keeps(seed, static_cast<uint64_t>(index), threshold) ? scale : A(0));
  return kept + to_acc(residual[index]);
}

template <typename T>
__global__ void dropout_add_layer_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                                      const T* __restrict__ weight, const T* __restrict__ bias,
                                                      T* __restrict__ out, typename AccType<T>::type* mean,
                                                      typename AccType<T>::type* rstd, int64_t channels,
                                                      uint64_t seed, uint32_t threshold, typename AccType<T>::type scale,
                                                      typename AccType<T>::type eps) {
  using A = typename AccType<T>::type;
  __shared__ A shared[33];
  const int64_t row = blockIdx.x, base = row * channels;
  A sum = 0;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) sum += dropped_sum(x, residual, base + c, seed, threshold, scale);
  const A mu = block_sum(sum, shared) / static_cast<A>(channels);
  A squares = 0;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    const A d = dropped_sum(x, residual, base + c, seed, threshold, scale) - mu;
    squares += d * d;
  }
  const A inv = A(1) / sqrt(block_sum(squares, shared) / static_cast<A>(channels) + eps);
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    const A xhat = (dropped_sum(x, residual, base + c, seed, threshold, scale) - mu) * inv;
    out[base + c] = from_acc<T>(xhat * to_acc(weight[c]) + to_acc(bias[c]));
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = inv;
  }
}

// d(h) = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = grad * weight; d(x) = d(h) * mask * scale,
// d(residual) = d(h); grad_times_xhat[row, c] = grad * xhat, summed over rows by the caller for d(weight).
template <typename T>
__global__ void dropout_add_layer_norm_backward_kernel(
    const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
    const typename AccType<T>::type* __restrict__ mean, const typename AccType<T>::type* __restrict__ rstd,
    T* __restrict__ grad_x, T* __restrict__ grad_residual, typename AccType<T>::type* __restrict__ grad_times_xhat,
    int64_t channels, uint64_t seed, uint32_t threshold, typename AccType<T>::type scale) {
  using A = typename AccType<T>::type;
  __shared__ A shared[33];
  const int64_t row = blockIdx.x, base = row * channels;
  const A mu = mean[row], inv = rstd[row];
  A sum_g = 0, sum_g_xhat = 0;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    const A xhat = (dropped_sum(x, residual, base + c, seed, threshold, scale) - mu) * inv;
    const A g_out = to_acc(grad[base + c]);
    const A g = g_out * to_acc(weight[c]);
    sum_g += g;
    sum_g_xhat += g * xhat;
    grad_times_xhat[base + c] = g_out * xhat;
  }
  const A mean_g = block_sum(sum_g, shared) / static_cast<A>(channels);
  const A mean_g_xhat = block_sum(sum_g_xhat, shared) / static_cast<A>(channels);
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    const int64_t i = base + c;
    const A m = dropout_keeps(seed, static_cast<uint64_t>(i), threshold) ? scale : A(0);  // multiplied, as forward
    const A h = to_acc(x[i]) * m + to_acc(residual[i]);
    const A xhat = (h - mu) * inv;
    const A dh = inv * (to_acc(grad[i]) * to_acc(weight[c]) - mean_g - xhat * mean_g_xhat);
    grad_residual[i] = from_acc<T>(dh);
    grad_x[i] = from_acc<T>(dh * m);
  }
}

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
