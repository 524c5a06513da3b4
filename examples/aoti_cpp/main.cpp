// Runs an AOTInductor package of a convbert_fast model from C++: no Python, no transformers; libtorch and the op
// library (convbert_fast/_C.abi3.so, whose kernels the package calls by name) are all it needs.
//
//   aoti_run MODEL.pt2 OP_LIBRARY.so < input
//
// input: B L, then B*L input ids, B*L attention-mask values (1 attend, 0 padding) and B*L token-type ids, all
// whitespace-separated. Output: for each of the model's outputs, a line with its shape, then its values, one a
// line (9 significant digits: a float32 read back exactly).
#include <dlfcn.h>

#include <cstdio>
#include <iostream>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 OP_LIBRARY.so < input\n";
    return 2;
  }
  // Loading the op library registers torch.ops.convbert_fast.* with libtorch's dispatcher, where the package's
  // proxy executor finds them. RTLD_LAZY: the library's one Python entry point (PyInit__C) is never called here.
  if (dlopen(argv[2], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::cerr << "cannot load the op library: " << dlerror() << "\n";
    return 1;
  }
  int64_t batch = 0, seq_len = 0;
  if (!(std::cin >> batch >> seq_len) || batch < 1 || seq_len < 1) {
    std::cerr << "input: expected B L (both positive) first\n";
    return 2;
  }
  std::vector<at::Tensor> inputs;  // input_ids, attention_mask, token_type_ids: [B, L] int64 each
  for (const char* name : {"input_ids", "attention_mask", "token_type_ids"}) {
    at::Tensor t = at::empty({batch, seq_len}, at::kLong);
    int64_t* data = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < batch * seq_len; ++i) {
      if (!(std::cin >> data[i])) {
        std::cerr << "input: " << name << " needs " << batch * seq_len << " integers\n";
        return 2;
      }
    }
    inputs.push_back(t);
  }
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<at::Tensor> outputs = loader.run(inputs);
  for (const at::Tensor& out : outputs) {
    at::Tensor values = out.to(at::kFloat).contiguous();
    std::cout << "shape";
    for (int64_t size : values.sizes()) std::cout << " " << size;
    std::cout << "\n";
    const float* data = values.data_ptr<float>();
    for (int64_t i = 0; i < values.numel(); ++i) std::printf("%.9g\n", data[i]);
  }
  return 0;
}
