// Launchers of the CUDA kernels, on raw pointers and a stream: no torch here, so that every .cu file
// compiles with nvcc alone (CMake target convbert_fast_cuda_kernels), on a machine without a GPU.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace convbert_fast {

enum class DType { Float32, Float64, Float16, BFloat16 };

// Largest kernel size of the span conv's CUDA kernels (the softmax weights live in shared memory).
constexpr int64_t kMaxCudaKernelSize = 63;

// out[b, t, h*D + d] = sum_j softmax(logits[b, t, h*K:(h+1)*K])[j] * values[b, t + j - K/2, h*D + d].
// values and logits contiguous; out rows at out_batch_stride / out_row_stride elements, channels dense.
cudaError_t span_conv_forward(DType dtype, const void* values, const void* logits, void* out, int64_t batch,
                              int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size,
                              int64_t out_batch_stride, int64_t out_row_stride, cudaStream_t stream);

// grad_values and grad_logits, all contiguous. `weights` ([B, L, H, K], fp64 for Float64, else fp32)
// receives the softmax weights between the two passes.
cudaError_t span_conv_backward(DType dtype, const void* grad_out, const void* values, const void* logits,
                               void* grad_values, void* grad_logits, void* weights, int64_t batch, int64_t seq_len,
                               int64_t heads, int64_t head_size, int64_t kernel_size, cudaStream_t stream);

// out[b, t, c] = sum_j taps[j, c] * x[b, t + j - K/2, c]; x, taps [K, C], out contiguous.
cudaError_t depthwise_conv_forward(DType dtype, const void* x, const void* taps, void* out, int64_t batch,
                                   int64_t seq_len, int64_t channels, int64_t kernel_size, cudaStream_t stream);

// partials[chunk, j, c] = sum over the rows of `chunk` of grad[row, c] * x[row + j - K/2, c]
// (fp64 for Float64, else fp32); summing them over chunks gives d(taps).
cudaError_t depthwise_conv_weight_grad_partials(DType dtype, const void* grad, const void* x, void* partials,
                                                int64_t batch, int64_t seq_len, int64_t channels,
                                                int64_t kernel_size, int64_t chunk_rows, cudaStream_t stream);

// out = LayerNorm(dropout(x) + residual) per row (all [rows, C] contiguous, weight and bias [C]); mean and rstd
// [rows] in fp32 (fp64 for Float64). The dropout mask is dropout_keeps(seed, row * C + c) (csrc/dropout_mask.h).
cudaError_t dropout_add_layer_norm_forward(DType dtype, const void* x, const void* residual, const void* weight,
                                           const void* bias, void* out, void* mean, void* rstd, int64_t rows,
                                           int64_t channels, uint64_t seed, double p, double eps, cudaStream_t stream);

// grad_x, grad_residual [rows, C]; grad_times_xhat [rows, C] in the accumulation dtype (summed over rows by the
// caller: d(weight)).
cudaError_t dropout_add_layer_norm_backward(DType dtype, const void* grad, const void* x, const void* residual,
                                            const void* weight, const void* mean, const void* rstd, void* grad_x,
                                            void* grad_residual, void* grad_times_xhat, int64_t rows, int64_t channels,
                                            uint64_t seed, double p, cudaStream_t stream);

}  // namespace convbert_fast
