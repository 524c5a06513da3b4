// Launchers of the span-conv kernels (torch-free: see launchers.h).
#include "../kernels/span_conv.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace convbert_fast {
namespace {

template <typename T>
using Acc = typename AccType<T>::type;

int64_t blocks_for(int64_t tasks) { return (tasks + kSpanWarpsPerBlock - 1) / kSpanWarpsPerBlock; }

template <typename T>
void forward(const void* values, const void* logits, void* out, int64_t batch, int64_t seq_len, int64_t heads,
             int64_t head_size, int64_t kernel_size, int64_t out_batch_stride, int64_t out_row_stride,
             cudaStream_t stream) {
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
              cudaStream_t stream) {
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
                               int64_t heads, int64_t head_size, int64_t kernel_size, cudaStream_t stream) {
  if (kernel_size < 1 || kernel_size > kMaxCudaKernelSize) return cudaErrorInvalidValue;
  if (batch * seq_len * heads == 0) return cudaSuccess;
  CONVBERT_FAST_DISPATCH(dtype, backward, grad_out, values, logits, grad_values, grad_logits, weights, batch,
                         seq_len, heads, head_size, kernel_size, stream)
  return cudaGetLastError();
}

}  // namespace convbert_fast
