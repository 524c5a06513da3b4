// LayerNorm(dropout(x) + residual), forward and backward, and dropout alone with the same mask; two sets of kernels
// while both stay (launchers.h: CONVBERT_FAST_CUDA_KERNELS). Both recompute h = dropout(x) + residual in the backward
// (the mask from (seed, index), see dropout_mask.h) instead of keeping it.
// v1, general: one block per row of C channels, h recomputed in each pass.
// v2, tiled (rows of up to 32 elements per lane, plan.h: norm_plan): a warp per row, lane l holding vectors l,
// l + 32, ... of the row in registers, so x and residual are read once, the dropout hash runs once per element (one
// multiply per vector: consecutive indices are kDropoutStep apart), and the statistics are warp sums. Weight and bias stay
// in registers for the warp's rows. The backward adds grad * xhat and grad over its block's rows in registers and
// writes one partial row per block for d(weight) and for d(bias) (summed by the caller in a fixed order:
// deterministic), instead of an fp32 [rows, C] buffer.
// The kernels, then their launchers (torch-free; nvcc only: tests/emulation/tiled_kernels.cpp compiles the
// kernels with g++).
#include <algorithm>
#include <cstdint>

#include "../dropout_mask.h"
#include "common.cuh"
#include "dispatch.cuh"

namespace convbert_fast {

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

// The mask's seed: read from the GPU where cf.ops had the CUDA generator draw it (launchers.h: DropoutSeed).
__device__ __forceinline__ uint64_t seed_value(DropoutSeed seed) {
  return seed.device != nullptr ? static_cast<uint64_t>(*seed.device) : seed.value;
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
                                                      DropoutSeed dropout_seed, uint32_t threshold,
                                                      typename AccType<T>::type scale, typename AccType<T>::type eps) {
  using A = typename AccType<T>::type;
  const uint64_t seed = seed_value(dropout_seed);
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
    int64_t channels, DropoutSeed dropout_seed, uint32_t threshold, typename AccType<T>::type scale) {
  using A = typename AccType<T>::type;
  const uint64_t seed = seed_value(dropout_seed);
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

// The tiled kernels' geometry: plan.h (kNormWarps, kNormForwardRows, kNormBackwardRows).
template <typename T>
constexpr int norm_vec() {
  return 16 / static_cast<int>(sizeof(T));
}

// h = dropout(x) + residual for the lane's vectors of `row`; masked vectors (v >= vectors) hold zeros.
template <typename T, int NV, bool Dropout>
__device__ __forceinline__ void dropped_sum(const T* x, const T* residual, int64_t row, int channels, int lane,
                                            uint64_t seed, uint32_t threshold, typename AccType<T>::type scale,
                                            typename AccType<T>::type (&h)[NV][norm_vec<T>()],
                                            bool (&keep)[NV][norm_vec<T>()]) {
  using A = typename AccType<T>::type;
  constexpr int VEC = norm_vec<T>();
  const int vectors = channels / VEC;
  const int64_t base = row * channels;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + 32 * i;
    const bool on = v < vectors;
    A xv[VEC], rv[VEC];
    load_vec<T, VEC, true>(x + base + v * VEC, on, VEC, xv);
    load_vec<T, VEC, true>(residual + base + v * VEC, on, VEC, rv);
    // the mixer's input of element index base + v * VEC + e, as dropout_keeps(seed, index, threshold)
    const uint64_t z = seed + static_cast<uint64_t>(base + v * VEC + 1) * kDropoutStep;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      keep[i][e] = !Dropout || dropout_keeps_mixed(z + static_cast<uint64_t>(e) * kDropoutStep, threshold);
      // multiplied, not selected: a dropped NaN or inf spreads as in eager; one rounding, in both passes
      h[i][e] = fma(xv[e], keep[i][e] ? scale : A(0), rv[e]);
    }
  }
}

template <typename T, int NV, bool Dropout>
__global__ void __launch_bounds__(kNormWarps * 32, 1)
    dropout_add_layer_norm_forward_tiled_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                                const T* __restrict__ weight, const T* __restrict__ bias,
                                                T* __restrict__ out, typename AccType<T>::type* __restrict__ mean,
                                                typename AccType<T>::type* __restrict__ rstd, int64_t rows,
                                                int channels, DropoutSeed dropout_seed, uint32_t threshold,
                                                typename AccType<T>::type scale, typename AccType<T>::type eps) {
  using A = typename AccType<T>::type;
  constexpr int VEC = norm_vec<T>();
  const uint64_t seed = Dropout ? seed_value(dropout_seed) : 0;
  const int lane = threadIdx.x & 31, vectors = channels / VEC;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kNormWarps + (threadIdx.x >> 5)) * kNormForwardRows;
  A w[NV][VEC], b[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + 32 * i;
    load_vec<T, VEC, true>(weight + v * VEC, v < vectors, VEC, w[i]);
    load_vec<T, VEC, true>(bias + v * VEC, v < vectors, VEC, b[i]);
  }
  for (int64_t row = first; row < first + kNormForwardRows && row < rows; ++row) {
    A h[NV][VEC];
    bool keep[NV][VEC];
    dropped_sum<T, NV, Dropout>(x, residual, row, channels, lane, seed, threshold, scale, h, keep);
    A sum = 0;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += h[i][e];
    }
    const A mu = warp_sum(sum) / static_cast<A>(channels);
    A squares = 0;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (lane + 32 * i < vectors) {  // a masked vector's zeros are not the row's
#pragma unroll
        for (int e = 0; e < VEC; ++e) squares += (h[i][e] - mu) * (h[i][e] - mu);
      }
    }
    const A inv = A(1) / sqrt(warp_sum(squares) / static_cast<A>(channels) + eps);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + 32 * i;
      A o[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] = (h[i][e] - mu) * inv * w[i][e] + b[i][e];
      store_vec<T, VEC, true>(out + row * channels + v * VEC, v < vectors, VEC, o);
    }
    if (lane == 0) {
      mean[row] = mu;
      rstd[row] = inv;
    }
  }
}

// partial[c] = the block's column sums of `mine` (one array per warp), added in warp order: deterministic.
template <typename A, int NV, int VEC>
__device__ __forceinline__ void block_column_sums(A (&columns)[kNormWarps][NV * 32 * VEC], const A (&mine)[NV][VEC],
                                                  A* partial, int channels) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) columns[warp][(lane + 32 * i) * VEC + e] = mine[i][e];
  }
  __syncthreads();
#pragma unroll 1
  for (int c = threadIdx.x; c < channels; c += kNormWarps * 32) {
    A total = columns[0][c];
#pragma unroll
    for (int k = 1; k < kNormWarps; ++k) total += columns[k][c];
    partial[c] = total;
  }
  __syncthreads();
}

// d(h) = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = grad * weight; d(x) = d(h) * mask * scale,
// d(residual) = d(h). weight_partials[block, c] = sum over the block's rows of grad * xhat, bias_partials of grad.
template <typename T, int NV, bool Dropout>
__global__ void __launch_bounds__(kNormWarps * 32, 1)
    dropout_add_layer_norm_backward_tiled_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                                 const T* __restrict__ residual, const T* __restrict__ weight,
                                                 const typename AccType<T>::type* __restrict__ mean,
                                                 const typename AccType<T>::type* __restrict__ rstd,
                                                 T* __restrict__ grad_x, T* __restrict__ grad_residual,
                                                 typename AccType<T>::type* __restrict__ weight_partials,
                                                 typename AccType<T>::type* __restrict__ bias_partials, int64_t rows,
                                                 int channels, DropoutSeed dropout_seed, uint32_t threshold,
                                                 typename AccType<T>::type scale) {
  using A = typename AccType<T>::type;
  constexpr int VEC = norm_vec<T>();
  const uint64_t seed = Dropout ? seed_value(dropout_seed) : 0;
  __shared__ A columns[kNormWarps][NV * 32 * VEC];  // the warps' column sums, added in warp order
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, vectors = channels / VEC;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kNormWarps + warp) * kNormBackwardRows;
  A w[NV][VEC], dw[NV][VEC], db[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + 32 * i;
    load_vec<T, VEC, true>(weight + v * VEC, v < vectors, VEC, w[i]);
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw[i][e] = db[i][e] = A(0);
  }
  for (int64_t row = first; row < first + kNormBackwardRows && row < rows; ++row) {
    A h[NV][VEC], g[NV][VEC];
    bool keep[NV][VEC];
    dropped_sum<T, NV, Dropout>(x, residual, row, channels, lane, seed, threshold, scale, h, keep);
    const A mu = mean[row], inv = rstd[row];
    A sum_g = 0, sum_g_xhat = 0;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + 32 * i;
      load_vec<T, VEC, true>(grad + row * channels + v * VEC, v < vectors, VEC, g[i]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A xhat = v < vectors ? (h[i][e] - mu) * inv : A(0);
        const A gw = g[i][e] * w[i][e];
        sum_g += gw;
        sum_g_xhat += gw * xhat;
        dw[i][e] += g[i][e] * xhat;
        db[i][e] += g[i][e];
        h[i][e] = xhat;
      }
    }
    const A mean_g = warp_sum(sum_g) / static_cast<A>(channels);
    const A mean_g_xhat = warp_sum(sum_g_xhat) / static_cast<A>(channels);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + 32 * i;
      A dh[VEC], dx[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dh[e] = inv * (g[i][e] * w[i][e] - mean_g - h[i][e] * mean_g_xhat);
        dx[e] = dh[e] * (keep[i][e] ? scale : A(0));  // multiplied, as the forward
      }
      store_vec<T, VEC, true>(grad_residual + row * channels + v * VEC, v < vectors, VEC, dh);
      store_vec<T, VEC, true>(grad_x + row * channels + v * VEC, v < vectors, VEC, dx);
    }
  }
  block_column_sums<A, NV, VEC>(columns, dw, weight_partials + static_cast<int64_t>(blockIdx.x) * channels, channels);
  block_column_sums<A, NV, VEC>(columns, db, bias_partials + static_cast<int64_t>(blockIdx.x) * channels, channels);
}

#if defined(__CUDACC__)
namespace {

// the plan's vectors per lane (plan.h: norm_plan): 1 to 4, and 6 or 8 in fp32 only
#define CONVBERT_FAST_WITH_VECTORS(NV_VALUE, NV, ...)                                        \
  switch (NV_VALUE) {                                                                        \
    case 1: { constexpr int NV = 1; __VA_ARGS__; } break;                                    \
    case 2: { constexpr int NV = 2; __VA_ARGS__; } break;                                    \
    case 3: { constexpr int NV = 3; __VA_ARGS__; } break;                                    \
    case 4: { constexpr int NV = 4; __VA_ARGS__; } break;                                    \
    case 6: if constexpr (sizeof(T) == 4) { constexpr int NV = 6; __VA_ARGS__; } break;      \
    default: if constexpr (sizeof(T) == 4) { constexpr int NV = 8; __VA_ARGS__; } break;     \
  }

template <typename T>
void launch_forward_tiled(const NormPlan& plan, const void* x, const void* residual, const void* weight,
                          const void* bias, void* out, void* mean, void* rstd, int64_t rows, int64_t channels,
                          DropoutSeed seed, double p, double eps, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const A scale = dropout_scale<A>(p);
  const uint32_t threshold = dropout_threshold(p);
  CONVBERT_FAST_WITH_VECTORS(plan.vectors, NV,
    // without dropout (p = 0: eval, or a caller's choice) the instantiation that computes no hash
    const auto kernel = threshold == 0 ? dropout_add_layer_norm_forward_tiled_kernel<T, NV, false>
                                       : dropout_add_layer_norm_forward_tiled_kernel<T, NV, true>;
    kernel<<<static_cast<unsigned>(plan.forward_blocks), kNormWarps * 32, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
        static_cast<const T*>(bias), static_cast<T*>(out), static_cast<A*>(mean), static_cast<A*>(rstd), rows,
        static_cast<int>(channels), seed, threshold, scale, static_cast<A>(eps)))
}

template <typename T>
void launch_backward_tiled(const NormPlan& plan, const void* grad, const void* x, const void* residual,
                           const void* weight, const void* mean, const void* rstd, void* grad_x, void* grad_residual,
                           void* weight_partials, void* bias_partials, int64_t rows, int64_t channels,
                           DropoutSeed seed, double p, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const A scale = dropout_scale<A>(p);
  const uint32_t threshold = dropout_threshold(p);
  CONVBERT_FAST_WITH_VECTORS(plan.vectors, NV,
    const auto kernel = threshold == 0 ? dropout_add_layer_norm_backward_tiled_kernel<T, NV, false>
                                       : dropout_add_layer_norm_backward_tiled_kernel<T, NV, true>;
    kernel<<<static_cast<unsigned>(plan.backward_blocks), kNormWarps * 32, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(residual),
        static_cast<const T*>(weight), static_cast<const A*>(mean), static_cast<const A*>(rstd),
        static_cast<T*>(grad_x), static_cast<T*>(grad_residual), static_cast<A*>(weight_partials),
        static_cast<A*>(bias_partials), rows, static_cast<int>(channels), seed, threshold, scale))
}

template <typename T>
void launch_forward(const NormPlan& plan, const void* x, const void* residual, const void* weight, const void* bias,
                    void* out, void* mean, void* rstd, int64_t rows, int64_t channels, DropoutSeed seed, double p,
                    double eps, cudaStream_t stream) {
  if (plan.vectors > 0) {
    launch_forward_tiled<T>(plan, x, residual, weight, bias, out, mean, rstd, rows, channels, seed, p, eps, stream);
    return;
  }
  using A = typename AccType<T>::type;
  const A scale = dropout_scale<A>(p);
  dropout_add_layer_norm_forward_kernel<T><<<static_cast<unsigned>(plan.forward_blocks), kNormThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
      static_cast<const T*>(bias), static_cast<T*>(out), static_cast<A*>(mean), static_cast<A*>(rstd), channels, seed,
      dropout_threshold(p), scale, static_cast<A>(eps));
}

template <typename T>
void launch_backward(const NormPlan& plan, const void* grad, const void* x, const void* residual, const void* weight,
                     const void* mean, const void* rstd, void* grad_x, void* grad_residual, void* weight_partials,
                     void* bias_partials, int64_t rows, int64_t channels, DropoutSeed seed, double p,
                     cudaStream_t stream) {
  if (plan.vectors > 0) {
    launch_backward_tiled<T>(plan, grad, x, residual, weight, mean, rstd, grad_x, grad_residual, weight_partials,
                             bias_partials, rows, channels, seed, p, stream);
    return;
  }
  using A = typename AccType<T>::type;
  const A scale = dropout_scale<A>(p);
  dropout_add_layer_norm_backward_kernel<T><<<static_cast<unsigned>(plan.backward_blocks), kNormThreads, 0, stream>>>(
      static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(residual),
      static_cast<const T*>(weight), static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<T*>(grad_x),
      static_cast<T*>(grad_residual), static_cast<A*>(weight_partials), channels, seed, dropout_threshold(p), scale);
}

// dropout alone (composite.h: dropout_elements): out[i] = x[i] * mask(i) / (1 - p) over the flat index, a grid-stride
// loop; the same decisions as the rows' kernels (dropout_keeps).
template <typename T>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t numel, DropoutSeed dropout_seed,
                               uint32_t threshold, typename AccType<T>::type scale) {
  using A = typename AccType<T>::type;
  const uint64_t seed = seed_value(dropout_seed);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const A m = dropout_keeps(seed, static_cast<uint64_t>(i), threshold) ? scale : A(0);
    out[i] = from_acc<T>(to_acc(x[i]) * m);
  }
}

constexpr int kDropoutThreads = 256;

template <typename T>
void launch_dropout(const void* x, void* out, int64_t numel, DropoutSeed seed, double p, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const A scale = dropout_scale<A>(p);
  // enough blocks to fill any GPU; the grid-stride loop covers the rest
  const int64_t blocks = std::min<int64_t>((numel + kDropoutThreads - 1) / kDropoutThreads, 65536);
  dropout_kernel<T><<<static_cast<unsigned>(blocks), kDropoutThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(out), numel, seed, dropout_threshold(p), scale);
}

}  // namespace

cudaError_t dropout_elements_forward(DType dtype, const void* x, void* out, int64_t numel, DropoutSeed seed, double p,
                                     cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  CONVBERT_FAST_DISPATCH(dtype, launch_dropout, x, out, numel, seed, p, stream);
  return cudaGetLastError();
}

cudaError_t dropout_add_layer_norm_forward(KernelChoice kernels, DType dtype, const void* x, const void* residual,
                                           const void* weight, const void* bias, void* out, void* mean, void* rstd,
                                           int64_t rows, int64_t channels, DropoutSeed seed, double p, double eps,
                                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const NormPlan plan = norm_forward_plan(kernels, dtype, x, residual, weight, bias, out, rows, channels);
  if (plan.forward_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // grid.x
  CONVBERT_FAST_DISPATCH(dtype, launch_forward, plan, x, residual, weight, bias, out, mean, rstd, rows, channels, seed,
                         p, eps, stream);
  return cudaGetLastError();
}

cudaError_t dropout_add_layer_norm_backward(KernelChoice kernels, DType dtype, const void* grad, const void* x,
                                            const void* residual, const void* weight, const void* mean,
                                            const void* rstd, void* grad_x, void* grad_residual,
                                            void* weight_partials, void* bias_partials, int64_t rows,
                                            int64_t channels, DropoutSeed seed, double p, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const NormPlan plan =
      norm_backward_plan(kernels, dtype, grad, x, residual, weight, grad_x, grad_residual, rows, channels);
  if (plan.backward_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // grid.x
  CONVBERT_FAST_DISPATCH(dtype, launch_backward, plan, grad, x, residual, weight, mean, rstd, grad_x, grad_residual,
                         weight_partials, bias_partials, rows, channels, seed, p, stream);
  return cudaGetLastError();
}
#endif  // __CUDACC__

}  // namespace convbert_fast
