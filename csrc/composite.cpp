#include "composite.h"

#include <c10/util/Exception.h>

namespace convbert_fast {

namespace {

void check_separable_args(const at::Tensor& x, const at::Tensor& depthwise_weight,
                          const at::Tensor& pointwise_weight, const at::Tensor& bias) {
  check_tensors("separable_conv1d", {{"x", x}, {"depthwise_weight", depthwise_weight},
                                     {"pointwise_weight", pointwise_weight}, {"bias", bias}});
  TORCH_CHECK_VALUE(x.dim() == 3, "separable_conv1d: x must be [B, L, C], got ", x.sizes());
  const int64_t channels = x.size(2);
  TORCH_CHECK_VALUE(
      depthwise_weight.dim() == 3 && depthwise_weight.size(0) == channels && depthwise_weight.size(1) == 1,
      "separable_conv1d: depthwise_weight must be [", channels, ", 1, K], got ", depthwise_weight.sizes());
  TORCH_CHECK_VALUE(depthwise_weight.size(2) % 2 == 1, "separable_conv1d: K must be odd, got ",
                    depthwise_weight.size(2));
  TORCH_CHECK_VALUE(
      pointwise_weight.dim() == 3 && pointwise_weight.size(1) == channels && pointwise_weight.size(2) == 1,
      "separable_conv1d: pointwise_weight must be [A, ", channels, ", 1], got ", pointwise_weight.sizes());
  TORCH_CHECK_VALUE(bias.numel() == pointwise_weight.size(0) && (bias.dim() == 1 || bias.dim() == 2),
                    "separable_conv1d: bias must be [", pointwise_weight.size(0), "] or [", pointwise_weight.size(0),
                    ", 1], got ", bias.sizes());
}

// The incoming gradient of an op's backward: the forward's output shape, and the device and dtype of `like` (x).
void check_grad(const char* op, const char* name, const at::Tensor& grad, const at::Tensor& like,
                at::IntArrayRef shape) {
  check_tensors(op, {{"x", like}, {name, grad}});
  TORCH_CHECK_VALUE(grad.sizes() == shape, op, ": ", name, " must be ", shape, ", got ", grad.sizes());
}

// [C, 1, K] -> [K, C]: each tap's weights contiguous over channels, as the kernels read them.
at::Tensor taps_by_channel(const at::Tensor& depthwise_weight) {
  return depthwise_weight.select(1, 0).t().contiguous();
}

void check_grouped_x_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.dim() == 3, op, ": weight must be [G, Din/G, Dout/G], got ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(0) * weight.size(1), op, ": x must be [..., ",
                    weight.size(0) * weight.size(1), "], got ", x.sizes());
}

void check_grouped_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_tensors("grouped_linear", {{"x", x}, {"weight", weight}, {"bias", bias}});
  check_grouped_x_weight("grouped_linear", x, weight);
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == weight.size(0) * weight.size(2),
                    "grouped_linear: bias must be [", weight.size(0) * weight.size(2), "], got ", bias.sizes());
}

// Rows of x seen as [rows, features]; reshape(-1, n) cannot tell when x is empty.
int64_t rows_of(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

at::ScalarType stat_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// x, residual and weight as the forward takes them (bias: the forward only), p.
void check_norm_args(const char* op, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                     const at::Tensor* bias, double p) {
  if (bias != nullptr) {
    check_tensors(op, {{"x", x}, {"residual", residual}, {"weight", weight}, {"bias", *bias}});
  } else {
    check_tensors(op, {{"x", x}, {"residual", residual}, {"weight", weight}});
  }
  TORCH_CHECK_VALUE(x.dim() >= 1 && residual.sizes() == x.sizes(), op, ": residual must be ", x.sizes(), ", got ",
                    residual.sizes());
  TORCH_CHECK_VALUE(x.size(-1) >= 1, op, ": the normalised dimension must not be empty");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be [", x.size(-1),
                    "], got ", weight.sizes());
  TORCH_CHECK_VALUE(bias == nullptr || bias->sizes() == weight.sizes(), op, ": bias must be [", x.size(-1), "], got ",
                    bias->sizes());
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": p must be in [0, 1], got ", p);
}

// The seed as the kernels take it: its value, from an int64 scalar tensor on the CPU (read without a device sync);
// or the int64 tensor, on the CPU or on the input's device (CUDA's kernels read it there).
int64_t seed_for(const char* op, const at::Tensor& seed, const at::Tensor&, const int64_t*) {
  TORCH_CHECK_VALUE(seed.device().is_cpu() && seed.numel() == 1 && seed.scalar_type() == at::kLong, op,
                    ": seed must be one int64 on the CPU, got ", seed.scalar_type(), " on ", seed.device(), " with ",
                    seed.numel(), " elements");
  return seed.item<int64_t>();
}
const at::Tensor& seed_for(const char* op, const at::Tensor& seed, const at::Tensor& x, const at::Tensor*) {
  TORCH_CHECK_VALUE((seed.is_cpu() || seed.device() == x.device()) && seed.numel() == 1 &&
                        seed.scalar_type() == at::kLong,
                    op, ": seed must be one int64 on the CPU or on ", x.device(),
                    " (the input's device), got ", seed.scalar_type(), " on ", seed.device(), " with ", seed.numel(),
                    " elements");
  return seed;
}

}  // namespace

void check_tensors(const char* op, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor& first = *tensors.begin();
  for (const NamedTensor& t : tensors) {
    TORCH_CHECK_VALUE(t.tensor.defined(), op, ": ", t.name, " is an undefined tensor");
    TORCH_CHECK_VALUE(t.tensor.device() == first.tensor.device(), op, ": ", t.name, " is on ", t.tensor.device(),
                      " but ", first.name, " on ", first.tensor.device(), "; all tensors must be on one device");
    TORCH_CHECK_TYPE(t.tensor.scalar_type() == first.tensor.scalar_type(), op, ": ", t.name, " is ",
                     t.tensor.scalar_type(), " but ", first.name, " is ", first.tensor.scalar_type(),
                     "; all tensors must share one dtype");
  }
  const at::ScalarType dtype = first.tensor.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": the kernels take float32, float64, float16 or bfloat16, got ", dtype);
}

void check_no_overlap(const char* op, const at::Tensor& out, std::initializer_list<NamedTensor> inputs) {
  // The bytes each tensor can reach, [first, last]: a conservative test (two interleaved views of one storage
  // that share no element are refused too), exact for the dense inputs the model passes.
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto* begin = static_cast<const char*>(t.const_data_ptr());
    return std::make_pair(begin, begin + (last + 1) * t.element_size());
  };
  if (out.numel() == 0) return;
  for (const NamedTensor& t : inputs) {
    if (t.tensor.numel() == 0 || !out.storage().is_alias_of(t.tensor.storage())) continue;
    const auto [a_begin, a_end] = span(out);
    const auto [b_begin, b_end] = span(t.tensor);
    TORCH_CHECK_VALUE(a_end <= b_begin || b_end <= a_begin, op, ": out overlaps ", t.name,
                      " in memory; the kernel would read what it writes");
  }
}

void check_span_conv_args(const at::Tensor& values, const at::Tensor& kernel_logits, int64_t num_heads) {
  check_tensors("dynamic_span_conv", {{"values", values}, {"kernel_logits", kernel_logits}});
  TORCH_CHECK_VALUE(num_heads >= 1, "dynamic_span_conv: num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK_VALUE(values.dim() == 3, "dynamic_span_conv: values must be [B, L, H*D], got ", values.sizes());
  TORCH_CHECK_VALUE(kernel_logits.dim() == 3 && kernel_logits.size(0) == values.size(0) &&
                        kernel_logits.size(1) == values.size(1),
                    "dynamic_span_conv: kernel_logits must be [B, L, H*K] with values' B and L, got ",
                    kernel_logits.sizes(), " and ", values.sizes());
  TORCH_CHECK_VALUE(values.size(2) % num_heads == 0 && kernel_logits.size(2) % num_heads == 0,
                    "dynamic_span_conv: num_heads must divide both last dimensions");
  TORCH_CHECK_VALUE((kernel_logits.size(2) / num_heads) % 2 == 1, "dynamic_span_conv: K must be odd");
}

void check_span_conv_grad(const at::Tensor& grad_out, const at::Tensor& values) {
  check_tensors("dynamic_span_conv_backward", {{"values", values}, {"grad_out", grad_out}});
  TORCH_CHECK_VALUE(grad_out.sizes() == values.sizes(), "dynamic_span_conv_backward: grad_out must be ",
                    values.sizes(), ", got ", grad_out.sizes());
}

void check_span_conv_out(const at::Tensor& values, const at::Tensor& kernel_logits, const at::Tensor& out) {
  check_tensors("dynamic_span_conv_into", {{"values", values}, {"out", out}});
  TORCH_CHECK_VALUE(out.sizes() == values.sizes(), "dynamic_span_conv_into: out must be ", values.sizes(), ", got ",
                    out.sizes());
  TORCH_CHECK_VALUE(out.size(2) <= 1 || out.stride(2) == 1,
                    "dynamic_span_conv_into: out's last dimension must be dense");
  // The kernels write row (b, t) at b * stride(0) + t * stride(1): rows that overlap would be written twice.
  TORCH_CHECK_VALUE((out.size(1) <= 1 || out.stride(1) >= out.size(2)) &&
                        (out.size(0) <= 1 || out.stride(0) >= (out.size(1) - 1) * out.stride(1) + out.size(2)),
                    "dynamic_span_conv_into: out's rows overlap each other (strides ", out.strides(), ")");
  check_no_overlap("dynamic_span_conv_into", out, {{"values", values}, {"kernel_logits", kernel_logits}});
}

at::Tensor sequence_offsets(const char* op, const OptionalTensor& cu_seqlens, const at::Tensor& x) {
  if (!cu_seqlens.has_value()) return at::Tensor();
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.device() == x.device(), op, ": cu_seqlens is on ", cu.device(), " but the input on ",
                    x.device());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, op, ": cu_seqlens must be 1-D offsets [N + 1] with N >= 1, got ",
                    "shape ", cu.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.size(0) == 1, op, ": with cu_seqlens the input must be one packed row [1, T, ",
                    "...], got ", x.sizes());
  at::Tensor offsets = cu.contiguous();
  if (offsets.is_cpu()) {
    const int32_t* o = offsets.const_data_ptr<int32_t>();
    const int64_t count = offsets.size(0) - 1, total = x.size(1);
    TORCH_CHECK_VALUE(o[0] == 0, op, ": cu_seqlens must start at 0, got ", o[0]);
    for (int64_t i = 0; i < count; ++i) {
      TORCH_CHECK_VALUE(o[i + 1] >= o[i], op, ": cu_seqlens must not decrease (a negative length): cu_seqlens[",
                        i + 1, "] = ", o[i + 1], " < cu_seqlens[", i, "] = ", o[i]);
    }
    TORCH_CHECK_VALUE(o[count] == total, op, ": cu_seqlens must end at the ", total, " tokens of the input, got ",
                      o[count]);
  }
  return offsets;
}

at::Tensor separable_conv1d(const at::Tensor& x, const at::Tensor& depthwise_weight,
                            const at::Tensor& pointwise_weight, const at::Tensor& bias,
                            const OptionalTensor& cu_seqlens, DepthwiseConvFn depthwise) {
  check_separable_args(x, depthwise_weight, pointwise_weight, bias);
  const at::Tensor offsets = sequence_offsets("separable_conv1d", cu_seqlens, x);
  const int64_t batch = x.size(0), seq_len = x.size(1), channels = x.size(2);
  const int64_t out_channels = pointwise_weight.size(0);
  at::Tensor mixed = depthwise(x.contiguous(), taps_by_channel(depthwise_weight), offsets);  // [B, L, C]
  // Pointwise conv = one GEMM on [B*L, C]; the bias rides in as the GEMM's C operand (beta = 1).
  at::Tensor out = at::addmm(bias.reshape({out_channels}), mixed.view({batch * seq_len, channels}),
                             pointwise_weight.view({out_channels, channels}).t());
  return out.view({batch, seq_len, out_channels});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> separable_conv1d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& depthwise_weight,
    const at::Tensor& pointwise_weight, const at::Tensor& bias, const OptionalTensor& cu_seqlens,
    DepthwiseConvFn depthwise, DepthwiseWeightGradFn depthwise_weight_grad) {
  check_separable_args(x, depthwise_weight, pointwise_weight, bias);
  const at::Tensor offsets = sequence_offsets("separable_conv1d_backward", cu_seqlens, x);
  const int64_t batch = x.size(0), seq_len = x.size(1), channels = x.size(2);
  const int64_t out_channels = pointwise_weight.size(0), kernel_size = depthwise_weight.size(2);
  check_grad("separable_conv1d_backward", "grad_out", grad_out, x, {batch, seq_len, out_channels});
  const at::Tensor x_c = x.contiguous();
  const at::Tensor taps = taps_by_channel(depthwise_weight);
  const at::Tensor grad = grad_out.contiguous().view({batch * seq_len, out_channels});
  const at::Tensor pointwise = pointwise_weight.view({out_channels, channels});

  // Recompute the depthwise output instead of saving it: one cheap pass against a [B, L, C] activation.
  at::Tensor mixed = depthwise(x_c, taps, offsets).view({batch * seq_len, channels});
  at::Tensor grad_pointwise = grad.t().mm(mixed).view_as(pointwise_weight);
  at::Tensor grad_bias = grad.sum(0).view_as(bias);
  at::Tensor grad_mixed = grad.mm(pointwise).view({batch, seq_len, channels});
  // d(x)[s] = sum_j w[j] grad_mixed[s - j + K/2]: the same conv with the taps reversed, inside the same sequences.
  at::Tensor grad_x = depthwise(grad_mixed, taps.flip(0).contiguous(), offsets);
  at::Tensor grad_depthwise =
      depthwise_weight_grad(grad_mixed, x_c, kernel_size, offsets).t().contiguous().view_as(depthwise_weight);
  return {grad_x, grad_depthwise, grad_pointwise, grad_bias};
}

at::Tensor dynamic_span_conv_concat(const at::Tensor& prefix, const at::Tensor& values, const at::Tensor& kernel_logits,
                                    int64_t num_heads, const OptionalTensor& cu_seqlens,
                                    SpanConvIntoFn span_conv_into) {
  check_span_conv_args(values, kernel_logits, num_heads);
  check_tensors("dynamic_span_conv_concat", {{"values", values}, {"prefix", prefix}});
  const int64_t batch = values.size(0), seq_len = values.size(1), width = values.size(2);
  TORCH_CHECK_VALUE(prefix.dim() >= 2 && prefix.size(0) == batch && prefix.size(1) == seq_len,
                    "dynamic_span_conv_concat: prefix must be [", batch, ", ", seq_len, ", ...], got ",
                    prefix.sizes());
  int64_t prefix_width = 1;
  for (int64_t d = 2; d < prefix.dim(); ++d) prefix_width *= prefix.size(d);
  at::Tensor out = at::empty({batch, seq_len, prefix_width + width}, values.options());
  out.narrow(2, 0, prefix_width).view(prefix.sizes()).copy_(prefix);  // one strided copy, e.g. [B, H, L, D]^T
  at::Tensor conv_half = out.narrow(2, prefix_width, width);
  span_conv_into(values, kernel_logits, num_heads, conv_half, cu_seqlens);
  return out;
}

// Checks, [rows, C] views, allocations and the weight and bias gradients (column sums, ATen's reduction) around
// the device's row kernels.
namespace {

template <typename Seed, typename RowsForward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& residual,
                                                            const at::Tensor& weight, const at::Tensor& bias, double p,
                                                            double eps, const at::Tensor& seed,
                                                            RowsForward rows_forward) {
  check_norm_args("dropout_add_layer_norm", x, residual, weight, &bias, p);
  TORCH_CHECK_VALUE(eps >= 0.0, "dropout_add_layer_norm: eps must be >= 0, got ", eps);
  const int64_t rows = rows_of(x), channels = x.size(-1);
  const at::Tensor x2 = x.contiguous().view({rows, channels}), r2 = residual.contiguous().view({rows, channels});
  at::Tensor out = at::empty_like(x2);
  at::Tensor mean = at::empty({rows}, x.options().dtype(stat_dtype(x))), rstd = at::empty_like(mean);
  rows_forward(x2, r2, weight.contiguous(), bias.contiguous(), p, eps,
               seed_for("dropout_add_layer_norm", seed, x, static_cast<Seed*>(nullptr)),
               out, mean, rstd);
  return {out.view(x.sizes()), mean, rstd};
}

template <typename Seed, typename RowsBackward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double p, const at::Tensor& seed, RowsBackward rows_backward) {
  const char* op = "dropout_add_layer_norm_backward";
  check_norm_args(op, x, residual, weight, nullptr, p);
  check_grad(op, "grad_out", grad_out, x, x.sizes());
  const int64_t rows = rows_of(x), channels = x.size(-1);
  for (const NamedTensor& stat : {NamedTensor{"mean", mean}, NamedTensor{"rstd", rstd}}) {
    TORCH_CHECK_VALUE(stat.tensor.device() == x.device(), op, ": ", stat.name, " is on ", stat.tensor.device(),
                      " but x on ", x.device());
    TORCH_CHECK_TYPE(stat.tensor.scalar_type() == stat_dtype(x), op, ": ", stat.name, " must be ", stat_dtype(x),
                     " (the forward's statistics), got ", stat.tensor.scalar_type());
    TORCH_CHECK_VALUE(stat.tensor.dim() == 1 && stat.tensor.size(0) == rows, op, ": ", stat.name, " must be [", rows,
                      "], got ", stat.tensor.sizes());
  }
  const at::Tensor g2 = grad_out.contiguous().view({rows, channels});
  const at::Tensor x2 = x.contiguous().view({rows, channels}), r2 = residual.contiguous().view({rows, channels});
  at::Tensor grad_x = at::empty_like(x2), grad_residual = at::empty_like(x2);
  at::Tensor weight_partials, bias_partials;  // allocated by rows_backward (composite.h)
  rows_backward(g2, x2, r2, weight.contiguous(), mean.contiguous(), rstd.contiguous(), p,
                seed_for(op, seed, x, static_cast<Seed*>(nullptr)), grad_x, grad_residual, weight_partials,
                bias_partials);
  at::Tensor grad_weight = weight_partials.sum(0).to(weight.scalar_type());
  at::Tensor grad_bias =
      (bias_partials.defined() ? bias_partials.sum(0) : g2.sum(0, false, stat_dtype(x))).to(weight.scalar_type());
  return {grad_x.view(x.sizes()), grad_residual.view(x.sizes()), grad_weight, grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                                      double p, double eps, const at::Tensor& seed,
                                                                      NormForwardFn rows_forward) {
  return norm_forward<int64_t>(x, residual, weight, bias, p, eps, seed, rows_forward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                                      double p, double eps, const at::Tensor& seed,
                                                                      NormForwardOnDeviceFn rows_forward) {
  return norm_forward<at::Tensor>(x, residual, weight, bias, p, eps, seed, rows_forward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double p, const at::Tensor& seed, NormBackwardFn rows_backward) {
  return norm_backward<int64_t>(grad_out, x, residual, weight, mean, rstd, p, seed, rows_backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double p, const at::Tensor& seed,
    NormBackwardOnDeviceFn rows_backward) {
  return norm_backward<at::Tensor>(grad_out, x, residual, weight, mean, rstd, p, seed, rows_backward);
}

namespace {

template <typename Seed, typename Kernel>
at::Tensor dropout_elements(const at::Tensor& x, double p, const at::Tensor& seed, Kernel kernel) {
  check_tensors("dropout", {{"x", x}});
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "dropout: p must be in [0, 1], got ", p);
  const at::Tensor contiguous = x.contiguous();  // the mask indexes elements in this order
  at::Tensor out = at::empty_like(contiguous);
  kernel(contiguous, p, seed_for("dropout", seed, x, static_cast<Seed*>(nullptr)), out);
  return out;
}

}  // namespace

at::Tensor dropout_elements(const at::Tensor& x, double p, const at::Tensor& seed, DropoutFn kernel) {
  return dropout_elements<int64_t>(x, p, seed, kernel);
}

at::Tensor dropout_elements(const at::Tensor& x, double p, const at::Tensor& seed, DropoutOnDeviceFn kernel) {
  return dropout_elements<at::Tensor>(x, p, seed, kernel);
}

// The groups are column blocks of the 2-D views [N, Din] and [N, Dout]: no permuted copies are made. On CUDA
// one strided-batched cuBLAS GEMM covers all groups (batch stride Din/G, leading dimension Din); on the CPU
// one GEMM per group reads and writes its block in place. The bias enters as the GEMM's C operand (beta = 1).
at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_grouped_args(x, weight, bias);
  const int64_t groups = weight.size(0), group_in = weight.size(1), group_out = weight.size(2);
  const int64_t rows = rows_of(x);
  const at::Tensor x2d = x.reshape({rows, groups * group_in}).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = groups * group_out;
  at::Tensor out = at::empty({rows, groups * group_out}, x.options());
  if (x.is_cuda()) {
    at::Tensor out_groups = out.view({rows, groups, group_out}).transpose(0, 1);  // [G, N, Dout/G], strided
    at::baddbmm_out(out_groups, bias.view({groups, 1, group_out}),
                    x2d.view({rows, groups, group_in}).transpose(0, 1), weight);
  } else {
    for (int64_t g = 0; g < groups; ++g) {
      at::Tensor out_block = out.narrow(1, g * group_out, group_out);
      at::addmm_out(out_block, bias.narrow(0, g * group_out, group_out), x2d.narrow(1, g * group_in, group_in),
                    weight.select(0, g));
    }
  }
  return out.view(out_shape);
}

// GELU as one elementwise pass over the GEMM's output (the pre-activation is returned for the backward).
std::tuple<at::Tensor, at::Tensor> grouped_linear_gelu(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& bias) {
  at::Tensor pre = grouped_linear(x, weight, bias);
  return {at::gelu(pre), pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward(const at::Tensor& grad_pre,
                                                                       const at::Tensor& x, const at::Tensor& weight) {
  check_tensors("grouped_linear_backward", {{"x", x}, {"weight", weight}});
  check_grouped_x_weight("grouped_linear_backward", x, weight);
  const int64_t groups = weight.size(0), group_in = weight.size(1), group_out = weight.size(2);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = groups * group_out;
  check_grad("grouped_linear_backward", "grad_pre", grad_pre, x, out_shape);
  const int64_t rows = rows_of(x);
  const at::Tensor x2d = x.reshape({rows, groups * group_in}).contiguous();
  const at::Tensor grad2d = grad_pre.reshape({rows, groups * group_out}).contiguous();
  at::Tensor grad_x = at::empty_like(x2d);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  if (x.is_cuda()) {
    const at::Tensor x_groups = x2d.view({rows, groups, group_in}).transpose(0, 1);  // [G, N, Din/G]
    const at::Tensor grad_groups = grad2d.view({rows, groups, group_out}).transpose(0, 1);  // [G, N, Dout/G]
    at::Tensor grad_x_groups = grad_x.view({rows, groups, group_in}).transpose(0, 1);
    at::bmm_out(grad_x_groups, grad_groups, weight.transpose(1, 2));
    at::bmm_out(grad_weight, x_groups.transpose(1, 2), grad_groups);
  } else {
    for (int64_t g = 0; g < groups; ++g) {
      const at::Tensor grad_block = grad2d.narrow(1, g * group_out, group_out);
      at::Tensor grad_x_block = grad_x.narrow(1, g * group_in, group_in);
      at::mm_out(grad_x_block, grad_block, weight.select(0, g).t());
      at::Tensor grad_weight_block = grad_weight.select(0, g);
      at::mm_out(grad_weight_block, x2d.narrow(1, g * group_in, group_in).t(), grad_block);
    }
  }
  return {grad_x.view(x.sizes()), grad_weight, grad2d.sum(0)};
}

}  // namespace convbert_fast
