// The depthwise half of the separable conv on the [B, L, C] layout: one thread per output element,
// consecutive threads on consecutive channels (coalesced), taps stored [K, C] for the same reason.
#pragma once
#include <cstdint>

#include "common.cuh"

namespace convbert_fast {

template <typename T, int KS>
__global__ void depthwise_conv_forward_kernel(const T* __restrict__ x, const T* __restrict__ taps, T* __restrict__ out,
                                              int64_t rows, int64_t seq_len, int64_t channels, int kernel_size) {
  using A = typename AccType<T>::type;
  const int K = KS > 0 ? KS : kernel_size, half = K / 2;
  const int64_t total = rows * channels;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / channels, c = i - row * channels, t = row % seq_len;
    A acc = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {  // fully unrolled when K is the compile-time KS
      const int64_t source = t + j - half;
      if (source >= 0 && source < seq_len) {
        acc += to_acc(taps[j * channels + c]) * to_acc(x[(row + j - half) * channels + c]);
      }
    }
    out[i] = from_acc<T>(acc);
  }
}

// One block column per channel range, one block row per chunk of rows: partial sums per (chunk, tap,
// channel), added up afterwards in chunk order (deterministic, no atomics).
template <typename T>
__global__ void depthwise_conv_weight_grad_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                                  typename AccType<T>::type* __restrict__ partials, int64_t rows,
                                                  int64_t seq_len, int64_t channels, int kernel_size,
                                                  int64_t chunk_rows) {
  using A = typename AccType<T>::type;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const int64_t chunk = blockIdx.y, begin = chunk * chunk_rows;
  const int64_t end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
  const int half = kernel_size / 2;
  for (int j = 0; j < kernel_size; ++j) {
    A acc = 0;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t source = row % seq_len + j - half;
      if (source >= 0 && source < seq_len) {
        acc += to_acc(grad[row * channels + c]) * to_acc(x[(row + j - half) * channels + c]);
      }
    }
    partials[(chunk * kernel_size + j) * channels + c] = acc;
  }
}

}  // namespace convbert_fast
