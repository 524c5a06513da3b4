// CPU kernels: the span conv and the depthwise conv, forward and backward, on the [B, L, C] layout.
// Rows (b, t) are split over threads with at::parallel_for; the inner loops run over contiguous
// channels with fp32 (fp64 for double) accumulators, written so that the compiler vectorises them.
// No reduction depends on the thread count, so every result is bitwise repeatable.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../composite.h"

namespace convbert_fast {
namespace {

// Rows per task: enough work per task to amortise scheduling.
int64_t grain_for(int64_t work_per_row) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row)); }

template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict__ acc, const scalar_t* __restrict__ x, acc_t a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * static_cast<acc_t>(x[i]);
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n) {
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]);
  return sum;
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* __restrict__ out, const acc_t* __restrict__ acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

// Softmax of K logits into `weights`, as torch.softmax does it (subtract the max, exponentiate, normalise).
template <typename scalar_t, typename acc_t>
inline void softmax(const scalar_t* logits, acc_t* weights, int64_t kernel_size) {
  acc_t max_logit = static_cast<acc_t>(logits[0]);
  for (int64_t j = 1; j < kernel_size; ++j) max_logit = std::max(max_logit, static_cast<acc_t>(logits[j]));
  // A NaN logit makes its exp, hence the total and every weight, NaN: as in torch.softmax.
  acc_t total = 0;
  for (int64_t j = 0; j < kernel_size; ++j) total += weights[j] = std::exp(static_cast<acc_t>(logits[j]) - max_logit);
  for (int64_t j = 0; j < kernel_size; ++j) weights[j] /= total;
}

// out[b, t, h*D + d] = sum_j softmax(logits[b, t, h*K : h*K + K])[j] * values[b, t + j - K/2, h*D + d]
template <typename scalar_t>
void span_conv_forward_kernel(const scalar_t* values, const scalar_t* logits, scalar_t* out, int64_t batch,
                              int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size,
                              int64_t out_batch_stride, int64_t out_row_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = heads * head_size, half = kernel_size / 2;
  at::parallel_for(0, batch * seq_len, grain_for(width * kernel_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> weights(kernel_size), acc(head_size);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / seq_len, t = row % seq_len;
      const int64_t first = std::max<int64_t>(0, half - t), last = std::min(kernel_size, seq_len + half - t);
      scalar_t* out_row = out + b * out_batch_stride + t * out_row_stride;
      for (int64_t h = 0; h < heads; ++h) {
        softmax(logits + (row * heads + h) * kernel_size, weights.data(), kernel_size);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = first; j < last; ++j) {  // taps inside [0, L); the zero padding adds nothing
          axpy(acc.data(), values + (row + j - half) * width + h * head_size, weights[j], head_size);
        }
        store(out_row + h * head_size, acc.data(), head_size);
      }
    }
  });
}

// d(logits) through the softmax, and d(values) as the transposed span: row s gathers the K rows
// t = s - j + K/2 that read it (no atomics, no thread-count-dependent sums).
template <typename scalar_t>
void span_conv_backward_kernel(const scalar_t* grad, const scalar_t* values, const scalar_t* logits,
                               scalar_t* grad_values, scalar_t* grad_logits, int64_t batch, int64_t seq_len,
                               int64_t heads, int64_t head_size, int64_t kernel_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = heads * head_size, half = kernel_size / 2, rows = batch * seq_len;
  std::vector<acc_t> all_weights(rows * heads * kernel_size);  // the softmax weights, kept for pass 2
  at::parallel_for(0, rows, grain_for(width * kernel_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_weights(kernel_size);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % seq_len;
      const int64_t first = std::max<int64_t>(0, half - t), last = std::min(kernel_size, seq_len + half - t);
      for (int64_t h = 0; h < heads; ++h) {
        acc_t* weights = all_weights.data() + (row * heads + h) * kernel_size;
        softmax(logits + (row * heads + h) * kernel_size, weights, kernel_size);
        const scalar_t* grad_row = grad + row * width + h * head_size;
        acc_t weighted = 0;
        for (int64_t j = 0; j < kernel_size; ++j) {
          grad_weights[j] = (j >= first && j < last)
                                ? dot<scalar_t, acc_t>(grad_row, values + (row + j - half) * width + h * head_size,
                                                       head_size)
                                : acc_t(0);
          weighted += weights[j] * grad_weights[j];
        }
        scalar_t* grad_logits_row = grad_logits + (row * heads + h) * kernel_size;
        for (int64_t j = 0; j < kernel_size; ++j) {
          grad_logits_row[j] = static_cast<scalar_t>(weights[j] * (grad_weights[j] - weighted));
        }
      }
    }
  });
  at::parallel_for(0, rows, grain_for(width * kernel_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(head_size);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row % seq_len;
      // tap j of row t = s - j + half reads row s; t must lie in [0, L)
      const int64_t first = std::max<int64_t>(0, s + half - (seq_len - 1)), last = std::min(kernel_size, s + half + 1);
      for (int64_t h = 0; h < heads; ++h) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = first; j < last; ++j) {
          const int64_t source = row - j + half;
          axpy(acc.data(), grad + source * width + h * head_size,
               all_weights[(source * heads + h) * kernel_size + j], head_size);
        }
        store(grad_values + row * width + h * head_size, acc.data(), head_size);
      }
    }
  });
}

// out[b, t, c] = sum_j taps[j, c] * x[b, t + j - K/2, c]
template <typename scalar_t>
void depthwise_forward_kernel(const scalar_t* x, const scalar_t* taps, scalar_t* out, int64_t batch, int64_t seq_len,
                              int64_t channels, int64_t kernel_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = kernel_size / 2;
  at::parallel_for(0, batch * seq_len, grain_for(channels * kernel_size), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(channels);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % seq_len;
      const int64_t first = std::max<int64_t>(0, half - t), last = std::min(kernel_size, seq_len + half - t);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = first; j < last; ++j) {
        const scalar_t* __restrict__ tap = taps + j * channels;
        const scalar_t* __restrict__ in = x + (row + j - half) * channels;
        for (int64_t c = 0; c < channels; ++c) acc[c] += static_cast<acc_t>(tap[c]) * static_cast<acc_t>(in[c]);
      }
      store(out + row * channels, acc.data(), channels);
    }
  });
}

// d(taps)[j, c] = sum over rows (b, t) of grad[b, t, c] * x[b, t + j - K/2, c]. Fixed chunks of rows give
// partial sums that are then added in chunk order: the same result for any number of threads.
template <typename scalar_t>
void depthwise_weight_grad_kernel(const scalar_t* grad, const scalar_t* x, scalar_t* grad_taps, int64_t batch,
                                  int64_t seq_len, int64_t channels, int64_t kernel_size) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kChunkRows = 64;
  const int64_t half = kernel_size / 2, rows = batch * seq_len;
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  std::vector<acc_t> partial(chunks * kernel_size * channels, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* part = partial.data() + chunk * kernel_size * channels;
      for (int64_t row = chunk * kChunkRows; row < std::min(rows, (chunk + 1) * kChunkRows); ++row) {
        const int64_t t = row % seq_len;
        const int64_t first = std::max<int64_t>(0, half - t), last = std::min(kernel_size, seq_len + half - t);
        const scalar_t* __restrict__ g = grad + row * channels;
        for (int64_t j = first; j < last; ++j) {
          const scalar_t* __restrict__ in = x + (row + j - half) * channels;
          acc_t* __restrict__ p = part + j * channels;
          for (int64_t c = 0; c < channels; ++c) p[c] += static_cast<acc_t>(g[c]) * static_cast<acc_t>(in[c]);
        }
      }
    }
  });
  std::vector<acc_t> total(kernel_size * channels, acc_t(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const acc_t* part = partial.data() + chunk * kernel_size * channels;
    for (int64_t i = 0; i < kernel_size * channels; ++i) total[i] += part[i];
  }
  store(grad_taps, total.data(), kernel_size * channels);
}

#define DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

void span_conv_into_cpu(const at::Tensor& values, const at::Tensor& kernel_logits, int64_t num_heads,
                        at::Tensor& out) {
  check_span_conv_args(values, kernel_logits, num_heads);
  check_span_conv_out(values, out);
  const at::Tensor v = values.contiguous(), k = kernel_logits.contiguous();
  const int64_t head_size = v.size(2) / num_heads, kernel_size = k.size(2) / num_heads;
  DISPATCH_FLOATS(v.scalar_type(), "dynamic_span_conv_cpu", [&] {
    span_conv_forward_kernel<scalar_t>(v.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), v.size(0), v.size(1), num_heads, head_size,
                                       kernel_size, out.stride(0), out.stride(1));
  });
}

at::Tensor span_conv_cpu(const at::Tensor& values, const at::Tensor& kernel_logits, int64_t num_heads) {
  at::Tensor out = at::empty(values.sizes(), values.options());
  span_conv_into_cpu(values, kernel_logits, num_heads, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> span_conv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                                          const at::Tensor& kernel_logits, int64_t num_heads) {
  check_span_conv_args(values, kernel_logits, num_heads);
  const at::Tensor g = grad_out.contiguous(), v = values.contiguous(), k = kernel_logits.contiguous();
  at::Tensor grad_values = at::empty_like(v), grad_logits = at::empty_like(k);
  DISPATCH_FLOATS(v.scalar_type(), "dynamic_span_conv_backward_cpu", [&] {
    span_conv_backward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                        k.const_data_ptr<scalar_t>(), grad_values.mutable_data_ptr<scalar_t>(),
                                        grad_logits.mutable_data_ptr<scalar_t>(), v.size(0), v.size(1), num_heads,
                                        v.size(2) / num_heads, k.size(2) / num_heads);
  });
  return {grad_values, grad_logits};
}

at::Tensor depthwise_cpu(const at::Tensor& x, const at::Tensor& taps) {
  at::Tensor out = at::empty_like(x);
  DISPATCH_FLOATS(x.scalar_type(), "depthwise_conv_cpu", [&] {
    depthwise_forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), taps.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2),
                                       taps.size(0));
  });
  return out;
}

at::Tensor depthwise_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size) {
  at::Tensor grad_taps = at::empty({kernel_size, x.size(2)}, x.options());
  DISPATCH_FLOATS(x.scalar_type(), "depthwise_conv_weight_grad_cpu", [&] {
    depthwise_weight_grad_kernel<scalar_t>(grad.contiguous().const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                           grad_taps.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2),
                                           kernel_size);
  });
  return grad_taps;
}

}  // namespace

TORCH_LIBRARY_IMPL(convbert_fast, CPU, m) {
  m.impl("dynamic_span_conv", &span_conv_cpu);
  m.impl("dynamic_span_conv_into", &span_conv_into_cpu);
  m.impl("dynamic_span_conv_backward", &span_conv_backward_cpu);
  m.impl("separable_conv1d", [](const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw, const at::Tensor& b) {
    return separable_conv1d(x, dw, pw, b, &depthwise_cpu);
  });
  m.impl("separable_conv1d_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw,
                                         const at::Tensor& pw, const at::Tensor& b) {
    return separable_conv1d_backward(g, x, dw, pw, b, &depthwise_cpu, &depthwise_weight_grad_cpu);
  });
  m.impl("grouped_linear", &grouped_linear);
  m.impl("grouped_linear_gelu", &grouped_linear_gelu);
  m.impl("grouped_linear_backward", &grouped_linear_backward);
}

}  // namespace convbert_fast
