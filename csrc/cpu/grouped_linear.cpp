// grouped_linear on the CPU: all GEMMs (composite.cpp), the same code on every device.
#include <torch/library.h>

#include "../composite.h"

namespace convbert_fast {

TORCH_LIBRARY_IMPL(convbert_fast, CPU, m) {
  m.impl("grouped_linear", &grouped_linear);
  m.impl("grouped_linear_gelu", &grouped_linear_gelu);
  m.impl("grouped_linear_backward", &grouped_linear_backward);
}

}  // namespace convbert_fast
