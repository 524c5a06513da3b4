// dynamic_span_conv on the CPU: forward and backward on the [B, L, H*D] layout.
#include "../composite.h"
#include "common.h"

namespace convbert_fast {
namespace {

// out[i] = sum_r weights[r] * rows[r][i] for i < n
template <typename scalar_t, int kBytes, typename acc_t>
inline void weighted_row_sum(const scalar_t* const* rows, const acc_t* weights, int64_t count, scalar_t* out,
                             int64_t n) {
  using T = Tile<acc_t, kBytes>;
  int64_t i0 = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    for (; i0 + 2 * kTile <= n; i0 += 2 * kTile) {
      T even, odd, x_even, x_odd;
      for (int64_t r = 0; r < count; ++r) {
        load_pairs(rows[r] + i0, x_even, x_odd);
        even.add(weights[r], x_even);
        odd.add(weights[r], x_odd);
      }
      store_pairs(even, odd, out + i0);
    }
  }
  for (; i0 + kTile <= n; i0 += kTile) {
    T acc, x;
    for (int64_t r = 0; r < count; ++r) {
      x.load(rows[r] + i0);
      acc.add(weights[r], x);
    }
    acc.store(out + i0);
  }
  if (i0 < n) {
    acc_t acc[kTile] = {};
    for (int64_t r = 0; r < count; ++r) {
      for (int64_t i = 0; i < n - i0; ++i) acc[i] += weights[r] * static_cast<acc_t>(rows[r][i0 + i]);
    }
    for (int64_t i = 0; i < n - i0; ++i) out[i0 + i] = static_cast<scalar_t>(acc[i]);
  }
}

// sum_i x[i] * y[i] over kTile interleaved partial sums (bf16: partial i takes channels 2i and 2i + 1 of each 32),
// added in a fixed order.
template <typename scalar_t, int kBytes, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n) {
  using T = Tile<acc_t, kBytes>;
  T partial, a, b;
  int64_t i0 = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    T odd_partial, a_odd, b_odd;
    for (; i0 + 2 * kTile <= n; i0 += 2 * kTile) {
      load_pairs(x + i0, a, a_odd);
      load_pairs(y + i0, b, b_odd);
      partial.add(a, b);
      odd_partial.add(a_odd, b_odd);
    }
    partial.add(odd_partial);
  }
  for (; i0 + kTile <= n; i0 += kTile) {
    a.load(x + i0);
    b.load(y + i0);
    partial.add(a, b);
  }
  acc_t tail[kTile] = {};
  for (int64_t i = 0; i0 + i < n; ++i) tail[i] = static_cast<acc_t>(x[i0 + i]) * static_cast<acc_t>(y[i0 + i]);
  a.load(tail);
  partial.add(a);
  return partial.sum();
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

template <typename scalar_t>
struct SpanArgs {
  const scalar_t* values;
  const scalar_t* logits;
  const scalar_t* grad;  // backward only
  scalar_t* out;  // forward: the output; backward: d(values)
  scalar_t* grad_logits;  // backward only
  at::opmath_type<scalar_t>* weights;  // backward: the softmax weights, [rows, H, K]
  Sequences sequences;  // the taps of a row reach only rows of its own sequence
  int64_t seq_len, heads, head_size, kernel_size, out_batch_stride, out_row_stride;
};

// out[b, t, h*D + d] = sum_j softmax(logits[b, t, h*K : h*K + K])[j] * values[b, t + j - K/2, h*D + d]
template <typename scalar_t, int kBytes>
void span_forward_rows(const SpanArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = a.heads * a.head_size, half = a.kernel_size / 2;
  std::vector<acc_t> weights(a.kernel_size);
  std::vector<const scalar_t*> rows(a.kernel_size);
  for (int64_t row = begin; row < end; ++row) {
    const auto [t, length] = a.sequences.locate(row);
    // taps inside the sequence only; the zero padding adds nothing
    const int64_t first = std::max<int64_t>(0, half - t), last = std::min(a.kernel_size, length + half - t);
    scalar_t* out_row = a.out + (row / a.seq_len) * a.out_batch_stride + (row % a.seq_len) * a.out_row_stride;
    for (int64_t h = 0; h < a.heads; ++h) {
      softmax(a.logits + (row * a.heads + h) * a.kernel_size, weights.data(), a.kernel_size);
      for (int64_t j = first; j < last; ++j) rows[j] = a.values + (row + j - half) * width + h * a.head_size;
      weighted_row_sum<scalar_t, kBytes>(rows.data() + first, weights.data() + first, last - first,
                                         out_row + h * a.head_size, a.head_size);
    }
  }
}

// Backward pass 1: d(logits) through the softmax; keeps the weights for pass 2.
template <typename scalar_t, int kBytes>
void span_backward_logits_rows(const SpanArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = a.heads * a.head_size, half = a.kernel_size / 2, K = a.kernel_size;
  std::vector<acc_t> grad_weights(K);
  for (int64_t row = begin; row < end; ++row) {
    const auto [t, length] = a.sequences.locate(row);
    const int64_t first = std::max<int64_t>(0, half - t), last = std::min(K, length + half - t);
    for (int64_t h = 0; h < a.heads; ++h) {
      acc_t* weights = a.weights + (row * a.heads + h) * K;
      softmax(a.logits + (row * a.heads + h) * K, weights, K);
      const scalar_t* grad_row = a.grad + row * width + h * a.head_size;
      acc_t weighted = 0;
      for (int64_t j = 0; j < K; ++j) {
        grad_weights[j] = (j >= first && j < last) ? dot<scalar_t, kBytes>(
                                                         grad_row, a.values + (row + j - half) * width + h * a.head_size,
                                                         a.head_size)
                                                   : acc_t(0);
        weighted += weights[j] * grad_weights[j];
      }
      scalar_t* grad_logits_row = a.grad_logits + (row * a.heads + h) * K;
      for (int64_t j = 0; j < K; ++j) grad_logits_row[j] = static_cast<scalar_t>(weights[j] * (grad_weights[j] - weighted));
    }
  }
}

// Backward pass 2: d(values) as the transposed span: row s gathers the K rows t = s - j + K/2 whose tap j
// read it (no atomics, no thread-count-dependent sums).
template <typename scalar_t, int kBytes>
void span_backward_values_rows(const SpanArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = a.heads * a.head_size, half = a.kernel_size / 2, K = a.kernel_size;
  std::vector<acc_t> weights(K);
  std::vector<const scalar_t*> sources(K);
  for (int64_t row = begin; row < end; ++row) {
    const auto [s, length] = a.sequences.locate(row);
    // tap j of row t = s - j + half reads row s; t must lie inside the sequence, [0, length)
    const int64_t first = std::max<int64_t>(0, s + half - (length - 1)), last = std::min(K, s + half + 1);
    for (int64_t h = 0; h < a.heads; ++h) {
      for (int64_t j = first; j < last; ++j) {
        const int64_t source = row - j + half;
        sources[j] = a.grad + source * width + h * a.head_size;
        weights[j] = a.weights[(source * a.heads + h) * K + j];
      }
      weighted_row_sum<scalar_t, kBytes>(sources.data() + first, weights.data() + first, last - first,
                                         a.out + row * width + h * a.head_size, a.head_size);
    }
  }
}

CONVBERT_FAST_CLONED(span_forward_rows, SpanArgs)
CONVBERT_FAST_CLONED(span_backward_logits_rows, SpanArgs)
CONVBERT_FAST_CLONED(span_backward_values_rows, SpanArgs)

void span_conv_into_cpu(const at::Tensor& values, const at::Tensor& kernel_logits, int64_t num_heads,
                        at::Tensor& out, const OptionalTensor& cu_seqlens) {
  check_span_conv_args(values, kernel_logits, num_heads);
  check_span_conv_out(values, kernel_logits, out);
  const at::Tensor offsets = sequence_offsets("dynamic_span_conv", cu_seqlens, values);
  const at::Tensor v = values.contiguous(), k = kernel_logits.contiguous();
  const int64_t head_size = v.size(2) / num_heads, kernel_size = k.size(2) / num_heads;
  DISPATCH_FLOATS(v.scalar_type(), "dynamic_span_conv_cpu", [&] {
    const SpanArgs<scalar_t> args{v.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), nullptr,
                                  out.mutable_data_ptr<scalar_t>(), nullptr, nullptr, Sequences(offsets, v.size(1)),
                                  v.size(1), num_heads, head_size, kernel_size, out.stride(0), out.stride(1)};
    at::parallel_for(0, v.size(0) * v.size(1), grain_for(v.size(2) * kernel_size),
                     [&](int64_t begin, int64_t end) { span_forward_rows_best(args, begin, end); });
  });
}

at::Tensor span_conv_cpu(const at::Tensor& values, const at::Tensor& kernel_logits, int64_t num_heads,
                         const OptionalTensor& cu_seqlens) {
  at::Tensor out = at::empty(values.sizes(), values.options());
  span_conv_into_cpu(values, kernel_logits, num_heads, out, cu_seqlens);
  return out;
}

std::tuple<at::Tensor, at::Tensor> span_conv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                                          const at::Tensor& kernel_logits, int64_t num_heads,
                                                          const OptionalTensor& cu_seqlens) {
  check_span_conv_args(values, kernel_logits, num_heads);
  check_span_conv_grad(grad_out, values);
  const at::Tensor offsets = sequence_offsets("dynamic_span_conv_backward", cu_seqlens, values);
  const at::Tensor g = grad_out.contiguous(), v = values.contiguous(), k = kernel_logits.contiguous();
  at::Tensor grad_values = at::empty_like(v), grad_logits = at::empty_like(k);
  const int64_t rows = v.size(0) * v.size(1), kernel_size = k.size(2) / num_heads;
  DISPATCH_FLOATS(v.scalar_type(), "dynamic_span_conv_backward_cpu", [&] {
    std::vector<at::opmath_type<scalar_t>> weights(rows * k.size(2));  // the softmax weights, between the passes
    const SpanArgs<scalar_t> args{v.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                  g.const_data_ptr<scalar_t>(), grad_values.mutable_data_ptr<scalar_t>(),
                                  grad_logits.mutable_data_ptr<scalar_t>(), weights.data(),
                                  Sequences(offsets, v.size(1)), v.size(1), num_heads, v.size(2) / num_heads,
                                  kernel_size, 0, 0};
    const int64_t grain = grain_for(v.size(2) * kernel_size);
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { span_backward_logits_rows_best(args, b, e); });
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { span_backward_values_rows_best(args, b, e); });
  });
  return {grad_values, grad_logits};
}
}  // namespace

TORCH_LIBRARY_IMPL(convbert_fast, CPU, m) {
  m.impl("dynamic_span_conv", &span_conv_cpu);
  m.impl("dynamic_span_conv_into", &span_conv_into_cpu);
  m.impl("dynamic_span_conv_backward", &span_conv_backward_cpu);
  m.impl("dynamic_span_conv_concat", [](const at::Tensor& prefix, const at::Tensor& values,
                                        const at::Tensor& kernel_logits, int64_t num_heads,
                                        const OptionalTensor& cu_seqlens) {
    return dynamic_span_conv_concat(prefix, values, kernel_logits, num_heads, cu_seqlens, &span_conv_into_cpu);
  });
}

}  // namespace convbert_fast
