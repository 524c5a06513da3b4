// Launchers of the depthwise-conv kernels (torch-free: see launchers.h).
#include <algorithm>
#include <climits>

#include "../kernels/depthwise_conv.cuh"
#include "../kernels/depthwise_conv_tiled.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace convbert_fast {
namespace {

constexpr int kThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether the tiled kernels take this shape: K = 9 and 32-bit offsets inside a sequence (rows < L + tile).
bool tiled(int64_t batch, int64_t seq_len, int64_t channels, int64_t kernel_size, int64_t tile) {
  return cuda_kernel_choice() == KernelChoice::kV2 && kernel_size == 9 && (seq_len + tile) * channels < INT_MAX &&
         batch * ceil_div(seq_len, tile) * ceil_div(channels, 32) < INT_MAX - kDepthwiseWarps;
}

// v1: chunks of chunk_rows consecutive rows of [B * L, C], at most 65535 (grid.y);
// v2: chunks of kWeightGradChunk tokens inside each sequence.
int64_t v1_chunk_rows(int64_t rows) { return std::max<int64_t>(64, ceil_div(rows, 65535)); }

template <typename T, bool Vector>
void forward_tiled(const void* x, const void* taps, void* out, int64_t batch, int64_t seq_len, int64_t channels,
                   cudaStream_t stream) {
  const int64_t tiles = ceil_div(seq_len, kDepthwiseTile), groups = ceil_div(channels, 32 * kDepthwiseVec);
  const int64_t tasks = batch * tiles * groups;
  depthwise_conv_forward_tiled_kernel<T, 9, Vector>
      <<<ceil_div(tasks, kDepthwiseWarps), kDepthwiseWarps * 32, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(taps), static_cast<T*>(out), static_cast<int>(tasks),
          static_cast<int>(tiles), static_cast<int>(groups), static_cast<int>(seq_len), static_cast<int>(channels));
}

template <typename T, bool Vector>
void weight_grad_tiled(const void* grad, const void* x, void* partials, int64_t batch, int64_t seq_len,
                       int64_t channels, cudaStream_t stream) {
  const int64_t chunks = ceil_div(seq_len, kWeightGradChunk), groups = ceil_div(channels, 32 * kWeightGradVec);
  const int64_t tasks = batch * chunks * groups;
  depthwise_conv_weight_grad_tiled_kernel<T, 9, Vector>
      <<<ceil_div(tasks, kDepthwiseWarps), kDepthwiseWarps * 32, 0, stream>>>(
          static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<typename AccType<T>::type*>(partials),
          static_cast<int>(tasks), static_cast<int>(chunks), static_cast<int>(groups), static_cast<int>(seq_len),
          static_cast<int>(channels));
}

template <typename T>
void forward(const void* x, const void* taps, void* out, int64_t batch, int64_t seq_len, int64_t channels,
             int64_t kernel_size, cudaStream_t stream) {
  if (tiled(batch, seq_len, channels, kernel_size, kDepthwiseTile)) {
    if (vectors_aligned(kDepthwiseVec, sizeof(T), {x, taps, out}, {channels})) {
      forward_tiled<T, true>(x, taps, out, batch, seq_len, channels, stream);
    } else {
      forward_tiled<T, false>(x, taps, out, batch, seq_len, channels, stream);
    }
    return;
  }
  const int64_t total = batch * seq_len * channels;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 30);  // grid-stride loop
  CONVBERT_FAST_WITH_KERNEL_SIZE(kernel_size, KS,
      depthwise_conv_forward_kernel<T, KS><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(taps), static_cast<T*>(out), batch * seq_len, seq_len,
          channels, static_cast<int>(kernel_size)))
}

template <typename T>
void weight_grad(const void* grad, const void* x, void* partials, int64_t batch, int64_t seq_len, int64_t channels,
                 int64_t kernel_size, cudaStream_t stream) {
  if (tiled(batch, seq_len, channels, kernel_size, kWeightGradChunk)) {
    if (vectors_aligned(kWeightGradVec, sizeof(T), {grad, x}, {channels})) {
      weight_grad_tiled<T, true>(grad, x, partials, batch, seq_len, channels, stream);
    } else {
      weight_grad_tiled<T, false>(grad, x, partials, batch, seq_len, channels, stream);
    }
    return;
  }
  const int64_t rows = batch * seq_len, chunk_rows = v1_chunk_rows(rows), chunks = ceil_div(rows, chunk_rows);
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

int64_t depthwise_conv_weight_grad_chunks(int64_t batch, int64_t seq_len, int64_t channels, int64_t kernel_size) {
  if (tiled(batch, seq_len, channels, kernel_size, kWeightGradChunk)) return batch * ceil_div(seq_len, kWeightGradChunk);
  const int64_t rows = batch * seq_len;
  return ceil_div(rows, v1_chunk_rows(rows));
}

cudaError_t depthwise_conv_weight_grad_partials(DType dtype, const void* grad, const void* x, void* partials,
                                                int64_t batch, int64_t seq_len, int64_t channels,
                                                int64_t kernel_size, cudaStream_t stream) {
  if (channels == 0 || batch * seq_len == 0) return cudaSuccess;
  CONVBERT_FAST_DISPATCH(dtype, weight_grad, grad, x, partials, batch, seq_len, channels, kernel_size, stream)
  return cudaGetLastError();
}

}  // namespace convbert_fast
