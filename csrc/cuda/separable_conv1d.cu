// The depthwise half of the separable conv on the [B, L, C] layout: one thread per output element,
// consecutive threads on consecutive channels (coalesced), taps stored [K, C] for the same reason.
// The kernels, then their launchers (torch-free: see launchers.h).
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "dispatch.cuh"
#include "launchers.h"

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

namespace {

constexpr int kThreads = 256;

template <typename T>
void forward(const void* x, const void* taps, void* out, int64_t batch, int64_t seq_len, int64_t channels,
             int64_t kernel_size, cudaStream_t stream) {
  const int64_t total = batch * seq_len * channels;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 30);  // grid-stride loop
  CONVBERT_FAST_WITH_KERNEL_SIZE(kernel_size, KS,
      depthwise_conv_forward_kernel<T, KS><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(taps), static_cast<T*>(out), batch * seq_len, seq_len,
          channels, static_cast<int>(kernel_size)))
}

template <typename T>
void weight_grad(const void* grad, const void* x, void* partials, int64_t batch, int64_t seq_len, int64_t channels,
                 int64_t kernel_size, int64_t chunk_rows, cudaStream_t stream) {
  const int64_t rows = batch * seq_len, chunks = (rows + chunk_rows - 1) / chunk_rows;
  const dim3 grid(static_cast<unsigned>((channels + kThreads - 1) / kThreads), static_cast<unsigned>(chunks));
  depthwise_conv_weight_grad_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<typename AccType<T>::type*>(partials), rows,
      seq_len, channels, static_cast<int>(kernel_size), chunk_rows);
}

}  // namespace

cudaError_t depthwise_conv_forward(DType dtype, const void* x, const void* taps, void* out, int64_t batch,
                                   int64_t seq_len, int64_t channels, int64_t kernel_size, cudaStream_t stream) {
  if (batch * seq_len * channels == 0) return cudaSuccess;
  CONVBERT_FAST_DISPATCH(dtype, forward, x, taps, out, batch, seq_len, channels, kernel_size, stream)
  return cudaGetLastError();
}

cudaError_t depthwise_conv_weight_grad_partials(DType dtype, const void* grad, const void* x, void* partials,
                                                int64_t batch, int64_t seq_len, int64_t channels,
                                                int64_t kernel_size, int64_t chunk_rows, cudaStream_t stream) {
  const int64_t chunks = (batch * seq_len + chunk_rows - 1) / chunk_rows;
  if (channels == 0 || chunks == 0) return cudaSuccess;
  if (chunk_rows < 1 || chunks > 65535) return cudaErrorInvalidValue;  // grid.y limit: the caller sizes chunks
  CONVBERT_FAST_DISPATCH(dtype, weight_grad, grad, x, partials, batch, seq_len, channels, kernel_size, chunk_rows,
                         stream)
  return cudaGetLastError();
}

}  // namespace convbert_fast
