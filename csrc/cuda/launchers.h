// Launchers of the CUDA kernels, on raw pointers and a stream: no torch here, so that every .cu file
// compiles with nvcc alone (CMake target convbert_fast_cuda_kernels), on a machine without a GPU.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "plan.h"

namespace convbert_fast {

// Every launcher takes the kernel choice its op read once (plan.h: KernelChoice), and sizes nothing itself: the glue
// allocates workspaces from the same plans (plan.h) with the same choice.

// Largest kernel size of the span conv's CUDA kernels (the softmax weights live in shared memory).
constexpr int64_t kMaxCudaKernelSize = 63;

// Packed sequences: the conv launchers take `offsets` (cu_seqlens, int32 [sequences + 1] on the device, 0 = o[0] <=
// ... <= o[sequences] = L) over the sequence dimension of one packed row (batch 1), each sequence's taps then
// stopping at its own ends, as if it ran alone; or nullptr: every batch row is one sequence. The offsets' values are
// not read on the host (that would sync the device): the kernels clamp what they find to the row, so no offsets
// make them reach outside their tensors. These are the host-side conditions (else cudaErrorInvalidValue).
inline bool packed_sequences_valid(int64_t batch, int64_t seq_len, const int32_t* offsets, int64_t sequences) {
  return offsets == nullptr || (batch == 1 && sequences >= 1 && sequences < INT32_MAX && seq_len < INT32_MAX);
}

// Whether this build holds code the current device can run (a cubin for its architecture, or PTX its driver can
// compile): cudaSuccess, else what a launch would fail with (cudaErrorNoKernelImageForDevice). Leaves no error pending.
cudaError_t kernel_image_for_current_device();

// out[b, t, h*D + d] = sum_j softmax(logits[b, t, h*K:(h+1)*K])[j] * values[b, t + j - K/2, h*D + d].
// logits contiguous; values and out rows at their batch / row strides (in elements), channels dense (values: the
// fused projection's slice, read where it lies).
cudaError_t span_conv_forward(KernelChoice kernels, DType dtype, const void* values, const void* logits, void* out,
                              int64_t batch, int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size,
                              int64_t values_batch_stride, int64_t values_row_stride, int64_t out_batch_stride,
                              int64_t out_row_stride, const int32_t* offsets, int64_t sequences, cudaStream_t stream);

// grad_values, grad_logits and logits contiguous; values rows at their strides; grad_out rows at grad_batch_stride /
// grad_row_stride elements, channels dense, when the plan is tiled (span_conv_plan), else contiguous. `weights`
// ([B, L, H, K], fp64 for Float64, else fp32) receives the softmax weights between the two passes of the general
// kernels (the tiled ones need no workspace).
cudaError_t span_conv_backward(KernelChoice kernels, DType dtype, const void* grad_out, const void* values,
                               const void* logits, void* grad_values, void* grad_logits, void* weights, int64_t batch,
                               int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size,
                               int64_t values_batch_stride, int64_t values_row_stride, int64_t grad_batch_stride,
                               int64_t grad_row_stride, const int32_t* offsets, int64_t sequences,
                               cudaStream_t stream);

// out[b, t, c] = sum_j taps[j, c] * x[b, t + j - K/2, c] (rows of t's sequence only); x, taps [K, C], out
// contiguous.
cudaError_t depthwise_conv_forward(KernelChoice kernels, DType dtype, const void* x, const void* taps, void* out,
                                   int64_t batch, int64_t seq_len, int64_t channels, int64_t kernel_size,
                                   const int32_t* offsets, int64_t sequences, cudaStream_t stream);

// partials[chunk, j, c] = sum over the rows of `chunk` of grad[row, c] * x[row + j - K/2, c] (rows of the same
// sequence only; fp64 for Float64, else fp32; [depthwise_weight_grad_plan(...).chunks, K, C], every entry written);
// summing them over chunks gives d(taps).
cudaError_t depthwise_conv_weight_grad_partials(KernelChoice kernels, DType dtype, const void* grad, const void* x,
                                                void* partials, int64_t batch, int64_t seq_len, int64_t channels,
                                                int64_t kernel_size, const int32_t* offsets, int64_t sequences,
                                                cudaStream_t stream);

// The dropout mask's seed: its value, or (device != nullptr) the int64 on the GPU that the kernels read, drawn there by
// the CUDA generator so that each replay of a captured CUDA graph has a new one.
struct DropoutSeed {
  uint64_t value;
  const int64_t* device;
};

// out = LayerNorm(dropout(x) + residual) per row (all [rows, C] contiguous, weight and bias [C]); mean and rstd
// [rows] in fp32 (fp64 for Float64). The dropout mask is dropout_keeps(seed, row * C + c) (csrc/dropout_mask.h).
cudaError_t dropout_add_layer_norm_forward(KernelChoice kernels, DType dtype, const void* x, const void* residual,
                                           const void* weight, const void* bias, void* out, void* mean, void* rstd,
                                           int64_t rows, int64_t channels, DropoutSeed seed, double p, double eps,
                                           cudaStream_t stream);

// grad_x, grad_residual [rows, C]; weight_partials [P, C] and bias_partials [Q, C] in the accumulation dtype, P and
// Q from norm_backward_plan (same arguments), every entry written: their column sums are d(weight) and d(bias).
// The general kernels write grad * xhat per row (P = rows) and no bias partials (Q = 0: the caller sums grad); the
// tiled ones one row of each per block of rows.
cudaError_t dropout_add_layer_norm_backward(KernelChoice kernels, DType dtype, const void* grad, const void* x,
                                            const void* residual, const void* weight, const void* mean,
                                            const void* rstd, void* grad_x, void* grad_residual,
                                            void* weight_partials, void* bias_partials, int64_t rows,
                                            int64_t channels, DropoutSeed seed, double p, cudaStream_t stream);

// out = x * mask / (1 - p) over numel contiguous elements, the mask dropout_keeps(seed, i) of the flat index i.
cudaError_t dropout_elements_forward(DType dtype, const void* x, void* out, int64_t numel, DropoutSeed seed, double p,
                                     cudaStream_t stream);

}  // namespace convbert_fast
