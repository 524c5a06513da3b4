// The dynamic span conv. One warp per (token row, head): the warp computes that head's softmax over its
// K logits into shared memory, then each lane accumulates D/32 channels over the K taps in fp32.
// Nothing of size K x values is materialised; value rows are re-read by the K neighbouring warps from cache.
// The kernels, then their launchers (torch-free: see launchers.h).
#include <cstdint>

#include "common.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace convbert_fast {

constexpr int kSpanWarpsPerBlock = 4;
constexpr int kSpanMaxKernel = kMaxCudaKernelSize + 1;  // the softmax scratch per warp: two logits per lane

// Softmax of the K (<= kMaxCudaKernelSize) logits at `logits` into weights[0, K), by one warp; as
// torch.softmax: x - max.
template <typename T, typename A>
__device__ __forceinline__ void warp_softmax(const T* logits, A* weights, int kernel_size, int lane) {
  const A neg_inf = -static_cast<A>(INFINITY);
  const A a = lane < kernel_size ? to_acc(logits[lane]) : neg_inf;
  const A b = lane + 32 < kernel_size ? to_acc(logits[lane + 32]) : neg_inf;
  const A max_logit = warp_max(a > b ? a : b);
  const A ea = lane < kernel_size ? exp(a - max_logit) : A(0);
  const A eb = lane + 32 < kernel_size ? exp(b - max_logit) : A(0);
  const A total = warp_sum(ea + eb);
  if (lane < kernel_size) weights[lane] = ea / total;
  if (lane + 32 < kernel_size) weights[lane + 32] = eb / total;
  __syncwarp();
}

// KS > 0 fixes the kernel size at compile time (unrolled taps); KS == 0 reads it from kernel_size.
template <typename T, int KS>
__global__ void __launch_bounds__(kSpanWarpsPerBlock * 32)
    span_conv_forward_kernel(const T* __restrict__ values, const T* __restrict__ logits, T* __restrict__ out,
                             int64_t batch, int64_t seq_len, int heads, int head_size, int kernel_size,
                             int64_t out_batch_stride, int64_t out_row_stride) {
  using A = typename AccType<T>::type;
  __shared__ A weights_smem[kSpanWarpsPerBlock][kSpanMaxKernel];
  const int K = KS > 0 ? KS : kernel_size;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kSpanWarpsPerBlock + warp;  // row * heads + h
  if (task >= batch * seq_len * heads) return;  // whole warps leave together
  const int64_t row = task / heads, t = row % seq_len;
  const int h = static_cast<int>(task % heads), half = K / 2;
  const int64_t width = static_cast<int64_t>(heads) * head_size;
  A* weights = weights_smem[warp];
  warp_softmax(logits + task * K, weights, K, lane);
  // taps j in [first, last) read rows inside [0, L); the zero padding adds nothing
  const int first = t < half ? static_cast<int>(half - t) : 0;
  const int last = seq_len - t + half < K ? static_cast<int>(seq_len - t + half) : K;
  const T* head_values = values + h * head_size;
  T* out_row = out + (row / seq_len) * out_batch_stride + t * out_row_stride + h * head_size;
  for (int d = lane; d < head_size; d += 32) {
    A acc = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {  // fully unrolled when K is the compile-time KS
      if (j >= first && j < last) acc += weights[j] * to_acc(head_values[(row + j - half) * width + d]);
    }
    out_row[d] = from_acc<T>(acc);
  }
}

// Pass 1 of the backward: d(logits) through the softmax, one warp per (row, head). The K dot products
// grad . values over the head's channels are warp sums (fixed order: deterministic). Keeps the weights.
template <typename T, int KS>
__global__ void __launch_bounds__(kSpanWarpsPerBlock * 32)
    span_conv_backward_logits_kernel(const T* __restrict__ grad, const T* __restrict__ values,
                                     const T* __restrict__ logits, T* __restrict__ grad_logits,
                                     typename AccType<T>::type* __restrict__ weights_out, int64_t batch,
                                     int64_t seq_len, int heads, int head_size, int kernel_size) {
  using A = typename AccType<T>::type;
  __shared__ A weights_smem[kSpanWarpsPerBlock][kSpanMaxKernel];
  __shared__ A grad_weights_smem[kSpanWarpsPerBlock][kSpanMaxKernel];
  const int K = KS > 0 ? KS : kernel_size;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kSpanWarpsPerBlock + warp;
  if (task >= batch * seq_len * heads) return;
  const int64_t row = task / heads, t = row % seq_len;
  const int h = static_cast<int>(task % heads), half = K / 2;
  const int64_t width = static_cast<int64_t>(heads) * head_size;
  A* weights = weights_smem[warp];
  A* grad_weights = grad_weights_smem[warp];
  warp_softmax(logits + task * K, weights, K, lane);
  const T* grad_row = grad + row * width + h * head_size;
  const T* head_values = values + h * head_size;
  for (int j = 0; j < K; ++j) {
    const int64_t source = t + j - half;  // position inside the sequence
    A partial = 0;
    if (source >= 0 && source < seq_len) {
      for (int d = lane; d < head_size; d += 32) {
        partial += to_acc(grad_row[d]) * to_acc(head_values[(row + j - half) * width + d]);
      }
    }
    partial = warp_sum(partial);
    if (lane == 0) grad_weights[j] = partial;
  }
  __syncwarp();
  A weighted = 0;
  for (int j = lane; j < K; j += 32) weighted += weights[j] * grad_weights[j];
  weighted = warp_sum(weighted);
  for (int j = lane; j < K; j += 32) {
    grad_logits[task * K + j] = from_acc<T>(weights[j] * (grad_weights[j] - weighted));
    weights_out[task * K + j] = weights[j];
  }
}

// Pass 2: d(values) as the transposed span, one warp per (row s, head): s gathers the K rows
// t = s - j + K/2 whose tap j read it. No atomics.
template <typename T, int KS>
__global__ void __launch_bounds__(kSpanWarpsPerBlock * 32)
    span_conv_backward_values_kernel(const T* __restrict__ grad, const typename AccType<T>::type* __restrict__ weights,
                                     T* __restrict__ grad_values, int64_t batch, int64_t seq_len, int heads,
                                     int head_size, int kernel_size) {
  using A = typename AccType<T>::type;
  const int K = KS > 0 ? KS : kernel_size;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kSpanWarpsPerBlock + warp;
  if (task >= batch * seq_len * heads) return;
  const int64_t row = task / heads, s = row % seq_len;
  const int h = static_cast<int>(task % heads), half = K / 2;
  const int64_t width = static_cast<int64_t>(heads) * head_size;
  // tap j of row t = s - j + half reads row s; t must lie in [0, L)
  const int first = s + half - (seq_len - 1) > 0 ? static_cast<int>(s + half - (seq_len - 1)) : 0;
  const int last = s + half + 1 < K ? static_cast<int>(s + half + 1) : K;
  for (int d = lane; d < head_size; d += 32) {
    A acc = 0;
    for (int j = first; j < last; ++j) {
      const int64_t source = row - j + half;
      acc += weights[(source * heads + h) * K + j] * to_acc(grad[source * width + h * head_size + d]);
    }
    grad_values[row * width + h * head_size + d] = from_acc<T>(acc);
  }
}

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
  if (blocks_for(batch * seq_len * heads) > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // grid.x
  CONVBERT_FAST_DISPATCH(dtype, forward, values, logits, out, batch, seq_len, heads, head_size, kernel_size,
                         out_batch_stride, out_row_stride, stream)
  return cudaGetLastError();
}

cudaError_t span_conv_backward(DType dtype, const void* grad_out, const void* values, const void* logits,
                               void* grad_values, void* grad_logits, void* weights, int64_t batch, int64_t seq_len,
                               int64_t heads, int64_t head_size, int64_t kernel_size, cudaStream_t stream) {
  if (kernel_size < 1 || kernel_size > kMaxCudaKernelSize) return cudaErrorInvalidValue;
  if (batch * seq_len * heads == 0) return cudaSuccess;
  if (blocks_for(batch * seq_len * heads) > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // grid.x
  CONVBERT_FAST_DISPATCH(dtype, backward, grad_out, values, logits, grad_values, grad_logits, weights, batch,
                         seq_len, heads, head_size, kernel_size, stream)
  return cudaGetLastError();
}

}  // namespace convbert_fast
