// Launchers of the depthwise-conv kernels (torch-free: see launchers.h).
#include <algorithm>

#include "../kernels/depthwise_conv.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace convbert_fast {
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
