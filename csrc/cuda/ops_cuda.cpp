// CUDA registrations: tensor checks, allocation and the current stream around the torch-free launchers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>

#include "../composite.h"
#include "launchers.h"

namespace convbert_fast {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "convbert_fast CUDA kernels take float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

// The dtype the kernels accumulate in, for their fp32/fp64 workspaces.
at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_launch(cudaError_t status, const char* what) {
  // The launchers check every grid size against CUDA's limits before narrowing it to dim3's unsigned, and return
  // cudaErrorInvalidConfiguration when one does not fit (nothing is launched).
  TORCH_CHECK_VALUE(status != cudaErrorInvalidConfiguration, "convbert_fast: ", what, ": the input needs a larger ",
                    "grid of thread blocks than CUDA launches (2^31 - 1 along x, 65535 along y and z); split it");
  TORCH_CHECK(status == cudaSuccess, "convbert_fast: ", what, " failed: ", cudaGetErrorString(status));
}

// CONVBERT_FAST_CUDA_KERNELS ("v2" or unset: the tiled kernels where they apply and pay by size; "v1": the general
// ones; "tiled": the tiled ones wherever they apply, whatever the size, so that tests at small sizes run them) is read
// from the environment once, when the library loads, and afterwards handed over by convbert_fast's Python ops each
// time os.environ's value changes (ops/cpp.py, through the _cuda_kernels op): nothing here calls getenv while ops
// run, since getenv racing another thread's setenv is undefined. Each op reads the choice once (kernel_choice) and
// passes it to every plan and launch it makes, so its workspaces and its kernels always agree.
constexpr const char* kKernelsVariable = "CONVBERT_FAST_CUDA_KERNELS";

std::optional<KernelChoice> parse_kernel_choice(const std::string& value) {
  if (value.empty() || value == "v2") return KernelChoice::kV2;
  if (value == "v1") return KernelChoice::kV1;
  if (value == "tiled") return KernelChoice::kTiled;
  return std::nullopt;
}

// The environment's value at load; set once, read-only afterwards.
const std::string& value_at_load() {
  static const std::string value = [] {
    const char* v = std::getenv(kKernelsVariable);
    return std::string(v == nullptr ? "" : v);
  }();
  return value;
}

// static_cast<int>(KernelChoice), or -1: the value at load was not one (every op raises until one is handed over)
int choice_at_load() {
  const std::optional<KernelChoice> choice = parse_kernel_choice(value_at_load());
  return choice ? static_cast<int>(*choice) : -1;
}
std::atomic<int> current_choice{choice_at_load()};

void refuse_unknown_choice(const std::string& value) {
  TORCH_CHECK_VALUE(false, "convbert_fast: ", kKernelsVariable, " must be v1, v2 or tiled (or unset: v2), got '", value, "'");
}

KernelChoice kernel_choice() {
  const int choice = current_choice.load(std::memory_order_relaxed);
  if (choice < 0) refuse_unknown_choice(value_at_load());
  return static_cast<KernelChoice>(choice);
}

// _cuda_kernels(value): hands over os.environ's value (raising for one it does not know); returns the choice in
// force, "v1", "v2" or "tiled".
std::string cuda_kernels(const std::optional<std::string>& value) {
  if (value.has_value()) {
    const std::optional<KernelChoice> choice = parse_kernel_choice(*value);
    if (!choice) refuse_unknown_choice(*value);
    current_choice.store(static_cast<int>(*choice), std::memory_order_relaxed);
  }
  switch (kernel_choice()) {
    case KernelChoice::kV1: return "v1";
    case KernelChoice::kTiled: return "tiled";
    default: return "v2";
  }
}

void check_cuda_kernel_size(int64_t kernel_size) {
  // A ValueError in Python; the Python wrapper relies on this check (the limit lives only in launchers.h).
  TORCH_CHECK_VALUE(kernel_size <= kMaxCudaKernelSize, "dynamic_span_conv: the cpp backend's CUDA kernels take ",
                    "kernel sizes up to ", kMaxCudaKernelSize, ", got ", kernel_size,
                    "; use the 'eager' backend for larger spans");
}

// values as the span conv kernels read it: in place (the fused projection's slice: no copy, issue 24) when its
// channels are dense and its strides not negative, else a contiguous copy.
at::Tensor span_values(const at::Tensor& values) {
  const bool in_place = (values.size(2) <= 1 || values.stride(2) == 1) && values.stride(0) >= 0 && values.stride(1) >= 0;
  return in_place ? values : values.contiguous();
}

// The launchers' form of sequence_offsets' result (composite.h): a device pointer and the number of sequences, or
// nullptr (batch rows). Their values are not read here (a device sync): the kernels clamp what they find.
struct Offsets {
  const int32_t* data;
  int64_t sequences;
  explicit Offsets(const at::Tensor& offsets)
      : data(offsets.defined() ? offsets.const_data_ptr<int32_t>() : nullptr),
        sequences(offsets.defined() ? offsets.size(0) - 1 : 0) {}
};

void span_conv_into_cuda(const at::Tensor& values, const at::Tensor& kernel_logits, int64_t num_heads,
                         at::Tensor& out, const OptionalTensor& cu_seqlens) {
  check_span_conv_args(values, kernel_logits, num_heads);
  check_span_conv_out(values, kernel_logits, out);
  const Offsets offsets(sequence_offsets("dynamic_span_conv", cu_seqlens, values));
  const KernelChoice kernels = kernel_choice();
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = span_values(values), k = kernel_logits.contiguous();
  const int64_t kernel_size = k.size(2) / num_heads;
  check_cuda_kernel_size(kernel_size);
  check_launch(span_conv_forward(kernels, dtype_of(v), v.const_data_ptr(), k.const_data_ptr(), out.mutable_data_ptr(),
                                 v.size(0), v.size(1), num_heads, v.size(2) / num_heads, kernel_size, v.stride(0),
                                 v.stride(1), out.stride(0), out.stride(1), offsets.data, offsets.sequences,
                                 c10::cuda::getCurrentCUDAStream()),
               "dynamic_span_conv");
}

at::Tensor span_conv_cuda(const at::Tensor& values, const at::Tensor& kernel_logits, int64_t num_heads,
                          const OptionalTensor& cu_seqlens) {
  at::Tensor out = at::empty(values.sizes(), values.options());
  span_conv_into_cuda(values, kernel_logits, num_heads, out, cu_seqlens);
  return out;
}

std::tuple<at::Tensor, at::Tensor> span_conv_backward_cuda(const at::Tensor& grad_out, const at::Tensor& values,
                                                           const at::Tensor& kernel_logits, int64_t num_heads,
                                                           const OptionalTensor& cu_seqlens) {
  check_span_conv_args(values, kernel_logits, num_heads);
  const Offsets offsets(sequence_offsets("dynamic_span_conv_backward", cu_seqlens, values));
  const KernelChoice kernels = kernel_choice();
  check_span_conv_grad(grad_out, values);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = span_values(values), k = kernel_logits.contiguous();
  const int64_t kernel_size = k.size(2) / num_heads, head_size = v.size(2) / num_heads;
  check_cuda_kernel_size(kernel_size);
  // the tiled kernels read grad_out through its row strides (the concat's slice of a wider gradient, uncopied)
  const bool strided = grad_out.sizes() == v.sizes() && (grad_out.size(2) <= 1 || grad_out.stride(2) == 1) &&
                       grad_out.stride(1) >= 0 &&
                       span_conv_plan(kernels, dtype_of(v), v.size(0), v.size(1), num_heads, head_size, kernel_size,
                                      std::max(v.stride(1), grad_out.stride(1)), true)
                           .tiled;
  const at::Tensor g = strided ? grad_out : grad_out.contiguous();
  at::Tensor grad_values = at::empty(v.sizes(), v.options()), grad_logits = at::empty_like(k);
  // the softmax weights between the general kernels' two passes (the tiled kernels need none)
  const at::TensorOptions acc = k.options().dtype(acc_dtype(k));
  at::Tensor weights = strided ? at::empty({0}, acc) : at::empty(k.sizes(), acc);
  check_launch(span_conv_backward(kernels, dtype_of(v), g.const_data_ptr(), v.const_data_ptr(), k.const_data_ptr(),
                                  grad_values.mutable_data_ptr(), grad_logits.mutable_data_ptr(),
                                  weights.mutable_data_ptr(), v.size(0), v.size(1), num_heads, head_size, kernel_size,
                                  v.stride(0), v.stride(1), g.stride(0), g.stride(1), offsets.data, offsets.sequences,
                                  c10::cuda::getCurrentCUDAStream()),
               "dynamic_span_conv_backward");
  return {grad_values, grad_logits};
}

at::Tensor depthwise_cuda(const at::Tensor& x, const at::Tensor& taps, const at::Tensor& offsets_or_undefined) {
  const Offsets offsets(offsets_or_undefined);
  const KernelChoice kernels = kernel_choice();
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  check_launch(depthwise_conv_forward(kernels, dtype_of(x), x.const_data_ptr(), taps.const_data_ptr(), out.mutable_data_ptr(),
                                      x.size(0), x.size(1), x.size(2), taps.size(0), offsets.data, offsets.sequences,
                                      c10::cuda::getCurrentCUDAStream()),
               "depthwise conv");
  return out;
}

at::Tensor depthwise_weight_grad_cuda(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size,
                                      const at::Tensor& offsets_or_undefined) {
  const Offsets offsets(offsets_or_undefined);
  const KernelChoice kernels = kernel_choice();
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad.contiguous();
  const int64_t chunks = depthwise_weight_grad_plan(kernels, x.size(0), x.size(1), x.size(2), kernel_size).chunks;
  at::Tensor partials = at::empty({chunks, kernel_size, x.size(2)}, x.options().dtype(acc_dtype(x)));  // all written
  check_launch(depthwise_conv_weight_grad_partials(kernels, dtype_of(x), g.const_data_ptr(), x.const_data_ptr(),
                                                   partials.mutable_data_ptr(), x.size(0), x.size(1), x.size(2),
                                                   kernel_size, offsets.data, offsets.sequences,
                                                   c10::cuda::getCurrentCUDAStream()),
               "depthwise conv weight gradient");
  return partials.sum(0).to(x.scalar_type());  // a fixed-order reduction: the same bits every run
}

// The seed as the kernels take it: its value when it is on the CPU, else its address (composite.cpp checked it is one
// int64 on the CPU or on the input's device).
DropoutSeed dropout_seed_of(const at::Tensor& seed) {
  if (seed.is_cpu()) return {static_cast<uint64_t>(seed.item<int64_t>()), nullptr};
  return {0, seed.const_data_ptr<int64_t>()};
}

void norm_forward_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                       double p, double eps, const at::Tensor& seed, at::Tensor& out, at::Tensor& mean,
                       at::Tensor& rstd) {
  const KernelChoice kernels = kernel_choice();
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(dropout_add_layer_norm_forward(kernels, dtype_of(x), x.const_data_ptr(), residual.const_data_ptr(),
                                              weight.const_data_ptr(), bias.const_data_ptr(), out.mutable_data_ptr(),
                                              mean.mutable_data_ptr(), rstd.mutable_data_ptr(), x.size(0), x.size(1),
                                              dropout_seed_of(seed), p, eps, c10::cuda::getCurrentCUDAStream()),
               "dropout_add_layer_norm");
}

void dropout_cuda(const at::Tensor& x, double p, const at::Tensor& seed, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(dropout_elements_forward(dtype_of(x), x.const_data_ptr(), out.mutable_data_ptr(), x.numel(),
                                        dropout_seed_of(seed), p, c10::cuda::getCurrentCUDAStream()),
               "dropout");
}

void norm_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual,
                        const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, double p,
                        const at::Tensor& seed, at::Tensor& grad_x, at::Tensor& grad_residual,
                        at::Tensor& weight_partials, at::Tensor& bias_partials) {
  const KernelChoice kernels = kernel_choice();
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), channels = x.size(1);
  const NormPlan sizes = norm_backward_plan(kernels, dtype_of(x), grad.const_data_ptr(), x.const_data_ptr(),
                                            residual.const_data_ptr(), weight.const_data_ptr(),
                                            grad_x.const_data_ptr(), grad_residual.const_data_ptr(), rows, channels);
  weight_partials = at::empty({sizes.weight_rows, channels}, x.options().dtype(acc_dtype(x)));
  if (sizes.bias_rows > 0) bias_partials = at::empty({sizes.bias_rows, channels}, weight_partials.options());
  check_launch(dropout_add_layer_norm_backward(kernels, dtype_of(x), grad.const_data_ptr(), x.const_data_ptr(),
                                               residual.const_data_ptr(), weight.const_data_ptr(), mean.const_data_ptr(),
                                               rstd.const_data_ptr(), grad_x.mutable_data_ptr(),
                                               grad_residual.mutable_data_ptr(), weight_partials.mutable_data_ptr(),
                                               sizes.bias_rows > 0 ? bias_partials.mutable_data_ptr() : nullptr, rows,
                                               channels, dropout_seed_of(seed), p,
                                               c10::cuda::getCurrentCUDAStream()),
               "dropout_add_layer_norm_backward");
}

// "" when _C holds code GPU `device` can run, else why not (read by cf.ops' `auto`, which falls back then).
std::string cuda_kernel_image(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaError_t status = kernel_image_for_current_device();
  if (status == cudaSuccess) return "";
  cudaDeviceProp properties;
  TORCH_CHECK(cudaGetDeviceProperties(&properties, static_cast<int>(device)) == cudaSuccess,
              "convbert_fast: cannot read the properties of CUDA device ", device);
  const std::string capability = std::to_string(properties.major) + "." + std::to_string(properties.minor);
  return "convbert_fast._C holds no code for " + std::string(properties.name) + " (compute capability " +
         capability + ": " + cudaGetErrorString(status) + "); it was built for TORCH_CUDA_ARCH_LIST (setup.py's " +
         "default: 8.0;9.0+PTX): rebuild it with TORCH_CUDA_ARCH_LIST=" + capability;
}

}  // namespace

// Ops of the CUDA build only, without tensors (catch-all kernels).
TORCH_LIBRARY_FRAGMENT(convbert_fast, m) {
  // CONVBERT_FAST_CUDA_KERNELS handed over from Python (None: only read it) -> the choice in force, "v1", "v2" or "tiled"
  m.def("_cuda_kernels(str? value=None) -> str", &cuda_kernels);
  // "" when the kernels have code GPU `device` can run, else why not
  m.def("_cuda_kernel_image(int device) -> str", &cuda_kernel_image);
}

TORCH_LIBRARY_IMPL(convbert_fast, CUDA, m) {
  m.impl("dynamic_span_conv", &span_conv_cuda);
  m.impl("dynamic_span_conv_into", &span_conv_into_cuda);
  m.impl("dynamic_span_conv_backward", &span_conv_backward_cuda);
  m.impl("dynamic_span_conv_concat", [](const at::Tensor& prefix, const at::Tensor& values,
                                        const at::Tensor& kernel_logits, int64_t num_heads,
                                        const OptionalTensor& cu_seqlens) {
    return dynamic_span_conv_concat(prefix, values, kernel_logits, num_heads, cu_seqlens, &span_conv_into_cuda);
  });
  m.impl("dropout_add_layer_norm", [](const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b,
                                      double p, double eps, const at::Tensor& seed) {
    return dropout_add_layer_norm(x, r, w, b, p, eps, seed, &norm_forward_cuda);
  });
  m.impl("dropout", [](const at::Tensor& x, double p, const at::Tensor& seed) {
    return dropout_elements(x, p, seed, &dropout_cuda);
  });
  m.impl("dropout_add_layer_norm_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& r,
                                               const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rstd,
                                               double p, const at::Tensor& seed) {
    return dropout_add_layer_norm_backward(g, x, r, w, mean, rstd, p, seed, &norm_backward_cuda);
  });
  m.impl("separable_conv1d", [](const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw, const at::Tensor& b,
                                const OptionalTensor& cu_seqlens) {
    return separable_conv1d(x, dw, pw, b, cu_seqlens, &depthwise_cuda);
  });
  m.impl("separable_conv1d_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw,
                                         const at::Tensor& pw, const at::Tensor& b, const OptionalTensor& cu_seqlens) {
    return separable_conv1d_backward(g, x, dw, pw, b, cu_seqlens, &depthwise_cuda, &depthwise_weight_grad_cuda);
  });
  m.impl("grouped_linear", &grouped_linear);
  m.impl("grouped_linear_gelu", &grouped_linear_gelu);
  m.impl("grouped_linear_backward", &grouped_linear_backward);
}

}  // namespace convbert_fast
