// LayerNorm(dropout(x) + residual), tiled (the v2 kernels; dropout_layer_norm.cuh's block-per-row ones take the
// other shapes). A warp per row: lane l holds 16-byte vectors l, l + 32, ... of the row (NV of them, C <= 32 NV
// x 16 bytes) in registers, so x and residual are read once, the dropout hash runs once per element (one
// multiply per vector: consecutive indices are kDropoutStep apart), and the statistics are warp sums. Weight and
// bias stay in registers for the warp's rows. The backward adds grad * xhat and grad over its block's rows in
// registers and writes one partial row per block for d(weight) and for d(bias) (summed by the caller in a fixed
// order: deterministic), instead of an fp32 [rows, C] buffer.
#pragma once
#include "dropout_mask.h"
#include "vector_io.cuh"

namespace convbert_fast {

constexpr int kNormWarps = 4;
constexpr int kNormForwardRows = 4;   // rows per warp
constexpr int kNormBackwardRows = 8;  // rows per warp: a block's partial sums cover 32 rows

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
      h[i][e] = keep[i][e] ? fma(xv[e], scale, rv[e]) : rv[e];  // one rounding, in both passes
    }
  }
}

template <typename T, int NV, bool Dropout>
__global__ void __launch_bounds__(kNormWarps * 32, 1)
    dropout_add_layer_norm_forward_tiled_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                                const T* __restrict__ weight, const T* __restrict__ bias,
                                                T* __restrict__ out, typename AccType<T>::type* __restrict__ mean,
                                                typename AccType<T>::type* __restrict__ rstd, int64_t rows,
                                                int channels, uint64_t seed, uint32_t threshold,
                                                typename AccType<T>::type scale, typename AccType<T>::type eps) {
  using A = typename AccType<T>::type;
  constexpr int VEC = norm_vec<T>();
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
                                                 int channels, uint64_t seed, uint32_t threshold,
                                                 typename AccType<T>::type scale) {
  using A = typename AccType<T>::type;
  constexpr int VEC = norm_vec<T>();
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
        dx[e] = keep[i][e] ? dh[e] * scale : A(0);
      }
      store_vec<T, VEC, true>(grad_residual + row * channels + v * VEC, v < vectors, VEC, dh);
      store_vec<T, VEC, true>(grad_x + row * channels + v * VEC, v < vectors, VEC, dx);
    }
  }
  block_column_sums<A, NV, VEC>(columns, dw, weight_partials + static_cast<int64_t>(blockIdx.x) * channels, channels);
  block_column_sums<A, NV, VEC>(columns, db, bias_partials + static_cast<int64_t>(blockIdx.x) * channels, channels);
}

}  // namespace convbert_fast
