// The op schemas: one TORCH_LIBRARY for the whole package. CPU and CUDA implementations register
// themselves beside their kernels (cpu/ops_cpu.cpp, cuda/ops_cuda.cpp).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import convbert_fast._C` loads this library, whose static initialisers register the ops below;
// the module itself is empty (no pybind11: the ops are reached through torch.ops.convbert_fast).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(convbert_fast, m) {
  // values [B, L, H*D], kernel_logits [B, L, H*K] (before the softmax) -> [B, L, H*D]
  m.def("dynamic_span_conv(Tensor values, Tensor kernel_logits, int num_heads) -> Tensor");
  // The same, written into `out` ([B, L, H*D], rows may be strided: a slice of a wider tensor).
  m.def("dynamic_span_conv_into(Tensor values, Tensor kernel_logits, int num_heads, Tensor(a!) out) -> ()");
  // [prefix | span conv] along the channels: [B, L, P + H*D], prefix [B, L, ...] with P elements per token. The
  // attention half of ConvBERT's context goes in as the prefix; the conv half is written in place (no cat).
  m.def("dynamic_span_conv_concat(Tensor prefix, Tensor values, Tensor kernel_logits, int num_heads) -> Tensor");
  // -> (grad_values, grad_kernel_logits)
  m.def("dynamic_span_conv_backward(Tensor grad_out, Tensor values, Tensor kernel_logits, int num_heads)"
        " -> (Tensor, Tensor)");
  // x [B, L, C], depthwise_weight [C, 1, K], pointwise_weight [A, C, 1], bias [A] or [A, 1] -> [B, L, A]
  m.def("separable_conv1d(Tensor x, Tensor depthwise_weight, Tensor pointwise_weight, Tensor bias) -> Tensor");
  // -> (grad_x, grad_depthwise_weight, grad_pointwise_weight, grad_bias)
  m.def("separable_conv1d_backward(Tensor grad_out, Tensor x, Tensor depthwise_weight, Tensor pointwise_weight,"
        " Tensor bias) -> (Tensor, Tensor, Tensor, Tensor)");
  // x [..., Din], weight [G, Din/G, Dout/G], bias [Dout] -> [..., Dout]
  m.def("grouped_linear(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  // -> (gelu(pre), pre): the pre-activation is kept for the backward pass
  m.def("grouped_linear_gelu(Tensor x, Tensor weight, Tensor bias) -> (Tensor, Tensor)");
  // grad_pre is the gradient of the linear output (before any activation) -> (grad_x, grad_weight, grad_bias)
  m.def("grouped_linear_backward(Tensor grad_pre, Tensor x, Tensor weight) -> (Tensor, Tensor, Tensor)");
}
