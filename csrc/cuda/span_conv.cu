// Launchers of the span-conv kernels (torch-free: see launchers.h).
#include <algorithm>
#include <climits>

#include "../kernels/span_conv.cuh"
#include "../kernels/span_conv_tiled.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace convbert_fast {
namespace {

template <typename T>
using Acc = typename AccType<T>::type;

int64_t blocks_for(int64_t tasks) { return (tasks + kSpanWarpsPerBlock - 1) / kSpanWarpsPerBlock; }

int64_t tiles_for(int64_t seq_len) { return (seq_len + kSpanTile - 1) / kSpanTile; }

// Whether the tiled kernels take this shape: K = 9, a head within a half-warp's channels, and the 32-bit
// offsets (row r < L + 64 times the largest row stride) and task count within int.
bool tiled(int64_t batch, int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size,
           int64_t row_stride) {
  const int64_t width = heads * head_size;
  return cuda_kernel_choice() == KernelChoice::kV2 && kernel_size == 9 && head_size <= 2 * 32 && row_stride >= 0 &&
         (seq_len + kSpanTile) * std::max(width, row_stride) < INT_MAX &&
         batch * heads * tiles_for(seq_len) < INT_MAX - 4;
}

template <typename T, bool Vector>
void forward_tiled(const void* values, const void* logits, void* out, int64_t batch, int64_t seq_len, int64_t heads,
                   int64_t head_size, int64_t out_batch_stride, int64_t out_row_stride, cudaStream_t stream) {
  const int64_t tiles = tiles_for(seq_len), tasks = batch * heads * tiles;
  constexpr int warps = span_tile_warps<T>();
  span_conv_forward_tiled_kernel<T, 9, Vector><<<(tasks + warps - 1) / warps, warps * 32, 0, stream>>>(
          static_cast<const T*>(values), static_cast<const T*>(logits), static_cast<T*>(out),
          static_cast<int>(tasks), static_cast<int>(tiles), static_cast<int>(seq_len), static_cast<int>(heads),
          static_cast<int>(head_size), out_batch_stride, static_cast<int>(out_row_stride));
}

template <typename T, bool Vector>
void backward_tiled(const void* grad_out, const void* values, const void* logits, void* grad_values,
                    void* grad_logits, int64_t batch, int64_t seq_len, int64_t heads, int64_t head_size,
                    int64_t grad_batch_stride, int64_t grad_row_stride, cudaStream_t stream) {
  const int64_t tiles = tiles_for(seq_len), tasks = batch * heads * tiles;
  constexpr int warps = span_tile_warps<T>();
  span_conv_backward_tiled_kernel<T, 9, Vector><<<(tasks + warps - 1) / warps, warps * 32, 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(values), static_cast<const T*>(logits),
          static_cast<T*>(grad_values), static_cast<T*>(grad_logits), static_cast<int>(tasks),
          static_cast<int>(tiles), static_cast<int>(seq_len), static_cast<int>(heads), static_cast<int>(head_size),
          grad_batch_stride, static_cast<int>(grad_row_stride));
}

template <typename T>
void forward(const void* values, const void* logits, void* out, int64_t batch, int64_t seq_len, int64_t heads,
             int64_t head_size, int64_t kernel_size, int64_t out_batch_stride, int64_t out_row_stride,
             cudaStream_t stream) {
  if (tiled(batch, seq_len, heads, head_size, kernel_size, out_row_stride)) {
    if (vectors_aligned(4, sizeof(T), {values, out}, {head_size, out_batch_stride, out_row_stride})) {
      forward_tiled<T, true>(values, logits, out, batch, seq_len, heads, head_size, out_batch_stride, out_row_stride,
                             stream);
    } else {
      forward_tiled<T, false>(values, logits, out, batch, seq_len, heads, head_size, out_batch_stride,
                              out_row_stride, stream);
    }
    return;
  }
  const int64_t tasks = batch * seq_len * heads;
  CONVBERT_FAST_WITH_KERNEL_SIZE(kernel_size, KS,
      span_conv_forward_kernel<T, KS><<<blocks_for(tasks), kSpanWarpsPerBlock * 32, 0, stream>>>(
          static_cast<const T*>(values), static_cast<const T*>(logits), static_cast<T*>(out), batch, seq_len,
          static_cast<int>(heads), static_cast<int>(head_size), static_cast<int>(kernel_size), out_batch_stride,
          out_row_stride))
}

template <typename T>
void backward(const void* grad_out, const void* values, const void* logits, void* grad_values, void* grad_logits,
              void* weights, int64_t batch, int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size,
              int64_t grad_batch_stride, int64_t grad_row_stride, cudaStream_t stream) {
  if (tiled(batch, seq_len, heads, head_size, kernel_size, grad_row_stride)) {
    if (vectors_aligned(4, sizeof(T), {grad_out, values, grad_values},
                        {head_size, grad_batch_stride, grad_row_stride})) {
      backward_tiled<T, true>(grad_out, values, logits, grad_values, grad_logits, batch, seq_len, heads, head_size,
                              grad_batch_stride, grad_row_stride, stream);
    } else {
      backward_tiled<T, false>(grad_out, values, logits, grad_values, grad_logits, batch, seq_len, heads, head_size,
                               grad_batch_stride, grad_row_stride, stream);
    }
    return;
  }
  const int64_t tasks = batch * seq_len * heads;
  CONVBERT_FAST_WITH_KERNEL_SIZE(kernel_size, KS,
      span_conv_backward_logits_kernel<T, KS><<<blocks_for(tasks), kSpanWarpsPerBlock * 32, 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(values), static_cast<const T*>(logits),
          static_cast<T*>(grad_logits), static_cast<Acc<T>*>(weights), batch, seq_len, static_cast<int>(heads),
          static_cast<int>(head_size), static_cast<int>(kernel_size));
      span_conv_backward_values_kernel<T, KS><<<blocks_for(tasks), kSpanWarpsPerBlock * 32, 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const Acc<T>*>(weights), static_cast<T*>(grad_values), batch,
          seq_len, static_cast<int>(heads), static_cast<int>(head_size), static_cast<int>(kernel_size)))
}

}  // namespace

cudaError_t span_conv_forward(DType dtype, const void* values, const void* logits, void* out, int64_t batch,
                              int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size,
                              int64_t out_batch_stride, int64_t out_row_stride, cudaStream_t stream) {
  if (kernel_size < 1 || kernel_size > kMaxCudaKernelSize) return cudaErrorInvalidValue;
  if (batch * seq_len * heads * head_size == 0) return cudaSuccess;
  CONVBERT_FAST_DISPATCH(dtype, forward, values, logits, out, batch, seq_len, heads, head_size, kernel_size,
                         out_batch_stride, out_row_stride, stream)
  return cudaGetLastError();
}

cudaError_t span_conv_backward(DType dtype, const void* grad_out, const void* values, const void* logits,
                               void* grad_values, void* grad_logits, void* weights, int64_t batch, int64_t seq_len,
                               int64_t heads, int64_t head_size, int64_t kernel_size, int64_t grad_batch_stride,
                               int64_t grad_row_stride, cudaStream_t stream) {
  if (kernel_size < 1 || kernel_size > kMaxCudaKernelSize) return cudaErrorInvalidValue;
  if (batch * seq_len * heads == 0) return cudaSuccess;
  CONVBERT_FAST_DISPATCH(dtype, backward, grad_out, values, logits, grad_values, grad_logits, weights, batch,
                         seq_len, heads, head_size, kernel_size, grad_batch_stride, grad_row_stride, stream)
  return cudaGetLastError();
}

bool span_conv_backward_reads_strided_grad(int64_t batch, int64_t seq_len, int64_t heads, int64_t head_size,
                                           int64_t kernel_size, int64_t grad_row_stride) {
  return tiled(batch, seq_len, heads, head_size, kernel_size, grad_row_stride);
}

}  // namespace convbert_fast
