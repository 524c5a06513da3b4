// The parts of the ops that are GEMMs (ATen: MKL/OpenBLAS on CPU, cuBLAS on CUDA) around each device's
// own depthwise-conv kernels, shared by the CPU and CUDA registrations.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <tuple>

namespace convbert_fast {

// The schemas' `Tensor? cu_seqlens` (ops.cpp): sequence offsets along the sequence dimension of one packed row.
using OptionalTensor = std::optional<at::Tensor>;
// `cu_seqlens` checked against x ([B, L, ...]): int32, 1-D with N + 1 >= 2 entries, on x's device, and B == 1;
// on the CPU also its values (cu[0] == 0, non-decreasing, cu[N] == L), each error naming the offsets it found.
// CUDA offsets are not read here (that would sync the device): the Python wrappers check their values before any
// backend runs, and the CUDA kernels clamp every row they read to [0, L). Returns them contiguous, or an
// undefined tensor when none were given (every batch row is then one sequence): what the kernels take below.
at::Tensor sequence_offsets(const char* op, const OptionalTensor& cu_seqlens, const at::Tensor& x);

// x [B, L, C] contiguous, weight_kc [K, C] contiguous (tap-major), offsets (sequence_offsets) -> [B, L, C], zero
// padding K/2 on both sides of each sequence.
using DepthwiseConvFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor& weight_kc, const at::Tensor& offsets);
// grad [B, L, C], x [B, L, C] contiguous, offsets -> d(weight_kc) [K, C]
using DepthwiseWeightGradFn = at::Tensor (*)(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size,
                                             const at::Tensor& offsets);

at::Tensor separable_conv1d(const at::Tensor& x, const at::Tensor& depthwise_weight,
                            const at::Tensor& pointwise_weight, const at::Tensor& bias,
                            const OptionalTensor& cu_seqlens, DepthwiseConvFn depthwise);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> separable_conv1d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& depthwise_weight,
    const at::Tensor& pointwise_weight, const at::Tensor& bias, const OptionalTensor& cu_seqlens,
    DepthwiseConvFn depthwise, DepthwiseWeightGradFn depthwise_weight_grad);

// values, kernel_logits, num_heads, out, cu_seqlens: the device's dynamic_span_conv_into
using SpanConvIntoFn = void (*)(const at::Tensor&, const at::Tensor&, int64_t, at::Tensor&, const OptionalTensor&);
at::Tensor dynamic_span_conv_concat(const at::Tensor& prefix, const at::Tensor& values, const at::Tensor& kernel_logits,
                                    int64_t num_heads, const OptionalTensor& cu_seqlens, SpanConvIntoFn span_conv_into);

// The device's row kernels of dropout_add_layer_norm on [rows, C] contiguous tensors; mean, rstd [rows] in the
// accumulation dtype (fp32; fp64 for fp64). The backward allocates and fills weight_partials [P, C] (accumulation
// dtype) whose column sums are d(weight), and either bias_partials [Q, C] likewise for d(bias) or nothing (then
// the caller sums grad): one row per chunk of 32 rows on the CPU (weight and bias), per block of rows in CUDA's tiled
// kernels.
using NormForwardFn = void (*)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                               const at::Tensor& bias, double p, double eps, int64_t seed, at::Tensor& out,
                               at::Tensor& mean, at::Tensor& rstd);
using NormBackwardFn = void (*)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual,
                                const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, double p,
                                int64_t seed, at::Tensor& grad_x, at::Tensor& grad_residual,
                                at::Tensor& weight_partials, at::Tensor& bias_partials);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                                      double p, double eps, const at::Tensor& seed,
                                                                      NormForwardFn rows_forward);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double p, const at::Tensor& seed, NormBackwardFn rows_backward);
// CUDA's row kernels take the seed as the int64 tensor: on the CPU (its value read on the host, as the CPU's), or on
// the input's device, read by the kernels: cf.ops has the CUDA generator draw it there, so each replay of a captured
// CUDA graph draws a new one.
using NormForwardOnDeviceFn = void (*)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                       const at::Tensor& bias, double p, double eps, const at::Tensor& seed,
                                       at::Tensor& out, at::Tensor& mean, at::Tensor& rstd);
using NormBackwardOnDeviceFn = void (*)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual,
                                        const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
                                        double p, const at::Tensor& seed, at::Tensor& grad_x,
                                        at::Tensor& grad_residual, at::Tensor& weight_partials,
                                        at::Tensor& bias_partials);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                                      double p, double eps, const at::Tensor& seed,
                                                                      NormForwardOnDeviceFn rows_forward);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double p, const at::Tensor& seed,
    NormBackwardOnDeviceFn rows_backward);

// dropout(x) alone, for the attention probabilities and the embeddings: out = x * mask / (1 - p) elementwise, the mask
// dropout_keeps(seed, i) of the flat index i (dropout_add_layer_norm's). The device's kernel on contiguous x and
// out; the seed as the row kernels above take it (its value, or the int64 tensor on CUDA).
using DropoutFn = void (*)(const at::Tensor& x, double p, int64_t seed, at::Tensor& out);
using DropoutOnDeviceFn = void (*)(const at::Tensor& x, double p, const at::Tensor& seed, at::Tensor& out);
at::Tensor dropout_elements(const at::Tensor& x, double p, const at::Tensor& seed, DropoutFn kernel);
at::Tensor dropout_elements(const at::Tensor& x, double p, const at::Tensor& seed, DropoutOnDeviceFn kernel);

at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
std::tuple<at::Tensor, at::Tensor> grouped_linear_gelu(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward(const at::Tensor& grad_pre,
                                                                       const at::Tensor& x, const at::Tensor& weight);

// Checks for direct torch.ops calls (opcheck makes them, and users can): every tensor argument's device, dtype,
// shape and, for outputs passed in, overlap with the inputs. ValueError / TypeError in Python. The Python
// wrappers check first, with friendlier errors; these keep a kernel from reading out of bounds.
struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};
// One device and one floating dtype (float32, float64, float16, bfloat16) for all of `tensors`.
void check_tensors(const char* op, std::initializer_list<NamedTensor> tensors);
// `out` shares no byte with any of `inputs`.
void check_no_overlap(const char* op, const at::Tensor& out, std::initializer_list<NamedTensor> inputs);
void check_span_conv_args(const at::Tensor& values, const at::Tensor& kernel_logits, int64_t num_heads);
void check_span_conv_grad(const at::Tensor& grad_out, const at::Tensor& values);
void check_span_conv_out(const at::Tensor& values, const at::Tensor& kernel_logits, const at::Tensor& out);


}  // namespace convbert_fast
