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
#include <type_traits>
#include <vector>

#include "../composite.h"
#include "../kernels/dropout_mask.h"

namespace convbert_fast {
namespace {

// Rows per task: enough work per task to amortise scheduling.
int64_t grain_for(int64_t work_per_row) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row)); }

// The inner loops work on tiles of kTile channels whose accumulators stay in registers across the taps;
// fixed-size tiles let the compiler vectorise them without reassociating any sum.
constexpr int64_t kTile = 16;

// out[i] = sum_r weights[r] * rows[r][i] for i < n
template <typename scalar_t, typename acc_t>
inline void weighted_row_sum(const scalar_t* const* rows, const acc_t* weights, int64_t count, scalar_t* out,
                             int64_t n) {
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    acc_t acc[kTile] = {};
    if (i0 + kTile <= n) {
      for (int64_t r = 0; r < count; ++r) {
        const scalar_t* __restrict__ src = rows[r] + i0;
        const acc_t w = weights[r];
        for (int64_t i = 0; i < kTile; ++i) acc[i] += w * static_cast<acc_t>(src[i]);
      }
      for (int64_t i = 0; i < kTile; ++i) out[i0 + i] = static_cast<scalar_t>(acc[i]);
    } else {
      for (int64_t r = 0; r < count; ++r) {
        for (int64_t i = 0; i < n - i0; ++i) acc[i] += weights[r] * static_cast<acc_t>(rows[r][i0 + i]);
      }
      for (int64_t i = 0; i < n - i0; ++i) out[i0 + i] = static_cast<scalar_t>(acc[i]);
    }
  }
}

// out[i] = sum_r taps[r][i] * rows[r][i] for i < n (a per-channel weight: the depthwise conv). Wider tiles
// than the span conv's: several independent accumulator chains per tap hide the FMA latency.
constexpr int64_t kChannelTile = 64;

template <typename scalar_t, typename acc_t>
inline void tapped_row_sum(const scalar_t* const* rows, const scalar_t* const* taps, int64_t count, scalar_t* out,
                           int64_t n) {
  for (int64_t i0 = 0; i0 < n; i0 += kChannelTile) {
    const int64_t len = std::min(kChannelTile, n - i0);
    acc_t acc[kChannelTile] = {};
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* __restrict__ src = rows[r] + i0;
      const scalar_t* __restrict__ tap = taps[r] + i0;
      if (len == kChannelTile) {
        for (int64_t i = 0; i < kChannelTile; ++i) acc[i] += static_cast<acc_t>(tap[i]) * static_cast<acc_t>(src[i]);
      } else {
        for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<acc_t>(tap[i]) * static_cast<acc_t>(src[i]);
      }
    }
    for (int64_t i = 0; i < len; ++i) out[i0 + i] = static_cast<scalar_t>(acc[i]);
  }
}

// sum_i x[i] * y[i] over kTile interleaved partial sums, added in a fixed order.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n) {
  acc_t partial[kTile] = {};
  int64_t i0 = 0;
  for (; i0 + kTile <= n; i0 += kTile) {
    for (int64_t i = 0; i < kTile; ++i) partial[i] += static_cast<acc_t>(x[i0 + i]) * static_cast<acc_t>(y[i0 + i]);
  }
  for (int64_t i = 0; i0 + i < n; ++i) partial[i] += static_cast<acc_t>(x[i0 + i]) * static_cast<acc_t>(y[i0 + i]);
  acc_t sum = 0;
  for (int64_t i = 0; i < kTile; ++i) sum += partial[i];
  return sum;
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

// The kernels below each process a range of rows, so that at::parallel_for stays outside them and the
// fp32/fp64 instantiations can be compiled once per x86 level (AVX-512, AVX2+FMA, baseline) and picked at
// load time (GCC function multi-versioning; `flatten` inlines the helpers into every clone).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CONVBERT_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define CONVBERT_FAST_CPU_CLONES
#endif

template <typename scalar_t>
struct SpanArgs {
  const scalar_t* values;
  const scalar_t* logits;
  const scalar_t* grad;  // backward only
  scalar_t* out;  // forward: the output; backward: d(values)
  scalar_t* grad_logits;  // backward only
  at::opmath_type<scalar_t>* weights;  // backward: the softmax weights, [rows, H, K]
  int64_t seq_len, heads, head_size, kernel_size, out_batch_stride, out_row_stride;
};

// out[b, t, h*D + d] = sum_j softmax(logits[b, t, h*K : h*K + K])[j] * values[b, t + j - K/2, h*D + d]
template <typename scalar_t>
void span_forward_rows(const SpanArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = a.heads * a.head_size, half = a.kernel_size / 2;
  std::vector<acc_t> weights(a.kernel_size);
  std::vector<const scalar_t*> rows(a.kernel_size);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / a.seq_len, t = row % a.seq_len;
    // taps inside [0, L) only; the zero padding adds nothing
    const int64_t first = std::max<int64_t>(0, half - t), last = std::min(a.kernel_size, a.seq_len + half - t);
    scalar_t* out_row = a.out + b * a.out_batch_stride + t * a.out_row_stride;
    for (int64_t h = 0; h < a.heads; ++h) {
      softmax(a.logits + (row * a.heads + h) * a.kernel_size, weights.data(), a.kernel_size);
      for (int64_t j = first; j < last; ++j) rows[j] = a.values + (row + j - half) * width + h * a.head_size;
      weighted_row_sum(rows.data() + first, weights.data() + first, last - first, out_row + h * a.head_size,
                       a.head_size);
    }
  }
}

// Backward pass 1: d(logits) through the softmax; keeps the weights for pass 2.
template <typename scalar_t>
void span_backward_logits_rows(const SpanArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = a.heads * a.head_size, half = a.kernel_size / 2, K = a.kernel_size;
  std::vector<acc_t> grad_weights(K);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t t = row % a.seq_len;
    const int64_t first = std::max<int64_t>(0, half - t), last = std::min(K, a.seq_len + half - t);
    for (int64_t h = 0; h < a.heads; ++h) {
      acc_t* weights = a.weights + (row * a.heads + h) * K;
      softmax(a.logits + (row * a.heads + h) * K, weights, K);
      const scalar_t* grad_row = a.grad + row * width + h * a.head_size;
      acc_t weighted = 0;
      for (int64_t j = 0; j < K; ++j) {
        grad_weights[j] = (j >= first && j < last) ? dot<scalar_t, acc_t>(
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
template <typename scalar_t>
void span_backward_values_rows(const SpanArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = a.heads * a.head_size, half = a.kernel_size / 2, K = a.kernel_size;
  std::vector<acc_t> weights(K);
  std::vector<const scalar_t*> sources(K);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t s = row % a.seq_len;
    // tap j of row t = s - j + half reads row s; t must lie in [0, L)
    const int64_t first = std::max<int64_t>(0, s + half - (a.seq_len - 1)), last = std::min(K, s + half + 1);
    for (int64_t h = 0; h < a.heads; ++h) {
      for (int64_t j = first; j < last; ++j) {
        const int64_t source = row - j + half;
        sources[j] = a.grad + source * width + h * a.head_size;
        weights[j] = a.weights[(source * a.heads + h) * K + j];
      }
      weighted_row_sum(sources.data() + first, weights.data() + first, last - first,
                       a.out + row * width + h * a.head_size, a.head_size);
    }
  }
}

template <typename scalar_t>
struct DepthwiseArgs {
  const scalar_t* x;
  const scalar_t* taps_or_grad;  // forward: taps [K, C]; weight gradient: d(out) [B, L, C]
  scalar_t* out;
  at::opmath_type<scalar_t>* partials;  // weight gradient: [chunks, K, C]
  int64_t rows, seq_len, channels, kernel_size, chunk_rows;
};

// out[b, t, c] = sum_j taps[j, c] * x[b, t + j - K/2, c]
template <typename scalar_t>
void depthwise_forward_rows(const DepthwiseArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = a.kernel_size / 2;
  std::vector<const scalar_t*> rows(a.kernel_size), tap_rows(a.kernel_size);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t t = row % a.seq_len;
    const int64_t first = std::max<int64_t>(0, half - t), last = std::min(a.kernel_size, a.seq_len + half - t);
    for (int64_t j = first; j < last; ++j) {
      rows[j] = a.x + (row + j - half) * a.channels;
      tap_rows[j] = a.taps_or_grad + j * a.channels;
    }
    tapped_row_sum<scalar_t, acc_t>(rows.data() + first, tap_rows.data() + first, last - first,
                                    a.out + row * a.channels, a.channels);
  }
}

// partials[chunk, j, c] = sum over the chunk's rows (b, t) of grad[b, t, c] * x[b, t + j - K/2, c]
template <typename scalar_t>
void depthwise_weight_grad_chunks(const DepthwiseArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = a.kernel_size / 2, C = a.channels;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    acc_t* part = a.partials + chunk * a.kernel_size * C;
    std::fill(part, part + a.kernel_size * C, acc_t(0));
    for (int64_t row = chunk * a.chunk_rows; row < std::min(a.rows, (chunk + 1) * a.chunk_rows); ++row) {
      const int64_t t = row % a.seq_len;
      const int64_t first = std::max<int64_t>(0, half - t), last = std::min(a.kernel_size, a.seq_len + half - t);
      const scalar_t* __restrict__ g = a.taps_or_grad + row * C;
      for (int64_t j = first; j < last; ++j) {
        const scalar_t* __restrict__ in = a.x + (row + j - half) * C;
        acc_t* __restrict__ p = part + j * C;
        for (int64_t c = 0; c < C; ++c) p[c] += static_cast<acc_t>(g[c]) * static_cast<acc_t>(in[c]);
      }
    }
  }
}

// One multi-versioned entry per (kernel, fp32/fp64); fp16/bf16 run the baseline template.
#define CONVBERT_FAST_CLONED(KERNEL, ARGS)                                                                       \
  CONVBERT_FAST_CPU_CLONES void KERNEL##_f32(const ARGS<float>& a, int64_t b, int64_t e) { KERNEL<float>(a, b, e); } \
  CONVBERT_FAST_CPU_CLONES void KERNEL##_f64(const ARGS<double>& a, int64_t b, int64_t e) { KERNEL<double>(a, b, e); } \
  template <typename scalar_t>                                                                                   \
  void KERNEL##_best(const ARGS<scalar_t>& a, int64_t b, int64_t e) {                                            \
    if constexpr (std::is_same_v<scalar_t, float>) KERNEL##_f32(a, b, e);                                        \
    else if constexpr (std::is_same_v<scalar_t, double>) KERNEL##_f64(a, b, e);                                  \
    else KERNEL<scalar_t>(a, b, e);                                                                              \
  }

CONVBERT_FAST_CLONED(span_forward_rows, SpanArgs)
CONVBERT_FAST_CLONED(span_backward_logits_rows, SpanArgs)
CONVBERT_FAST_CLONED(span_backward_values_rows, SpanArgs)
CONVBERT_FAST_CLONED(depthwise_forward_rows, DepthwiseArgs)
CONVBERT_FAST_CLONED(depthwise_weight_grad_chunks, DepthwiseArgs)

#define DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

void span_conv_into_cpu(const at::Tensor& values, const at::Tensor& kernel_logits, int64_t num_heads,
                        at::Tensor& out) {
  check_span_conv_args(values, kernel_logits, num_heads);
  check_span_conv_out(values, kernel_logits, out);
  const at::Tensor v = values.contiguous(), k = kernel_logits.contiguous();
  const int64_t head_size = v.size(2) / num_heads, kernel_size = k.size(2) / num_heads;
  DISPATCH_FLOATS(v.scalar_type(), "dynamic_span_conv_cpu", [&] {
    const SpanArgs<scalar_t> args{v.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), nullptr,
                                  out.mutable_data_ptr<scalar_t>(), nullptr, nullptr, v.size(1), num_heads,
                                  head_size, kernel_size, out.stride(0), out.stride(1)};
    at::parallel_for(0, v.size(0) * v.size(1), grain_for(v.size(2) * kernel_size),
                     [&](int64_t begin, int64_t end) { span_forward_rows_best(args, begin, end); });
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
  check_span_conv_grad(grad_out, values);
  const at::Tensor g = grad_out.contiguous(), v = values.contiguous(), k = kernel_logits.contiguous();
  at::Tensor grad_values = at::empty_like(v), grad_logits = at::empty_like(k);
  const int64_t rows = v.size(0) * v.size(1), kernel_size = k.size(2) / num_heads;
  DISPATCH_FLOATS(v.scalar_type(), "dynamic_span_conv_backward_cpu", [&] {
    std::vector<at::opmath_type<scalar_t>> weights(rows * k.size(2));  // the softmax weights, between the passes
    const SpanArgs<scalar_t> args{v.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                  g.const_data_ptr<scalar_t>(), grad_values.mutable_data_ptr<scalar_t>(),
                                  grad_logits.mutable_data_ptr<scalar_t>(), weights.data(), v.size(1), num_heads,
                                  v.size(2) / num_heads, kernel_size, 0, 0};
    const int64_t grain = grain_for(v.size(2) * kernel_size);
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { span_backward_logits_rows_best(args, b, e); });
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { span_backward_values_rows_best(args, b, e); });
  });
  return {grad_values, grad_logits};
}

at::Tensor depthwise_cpu(const at::Tensor& x, const at::Tensor& taps) {
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0) * x.size(1);
  DISPATCH_FLOATS(x.scalar_type(), "depthwise_conv_cpu", [&] {
    const DepthwiseArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), taps.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), nullptr, rows, x.size(1), x.size(2),
                                       taps.size(0), 0};
    at::parallel_for(0, rows, grain_for(x.size(2) * taps.size(0)),
                     [&](int64_t b, int64_t e) { depthwise_forward_rows_best(args, b, e); });
  });
  return out;
}

// Fixed chunks of rows give partial sums that are added in chunk order: the same result for any number
// of threads.
at::Tensor depthwise_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size) {
  constexpr int64_t kChunkRows = 64;
  const at::Tensor g = grad.contiguous();
  const int64_t rows = x.size(0) * x.size(1), chunks = (rows + kChunkRows - 1) / kChunkRows;
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partials = at::empty({chunks, kernel_size, x.size(2)}, x.options().dtype(acc_dtype));
  DISPATCH_FLOATS(x.scalar_type(), "depthwise_conv_weight_grad_cpu", [&] {
    const DepthwiseArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), nullptr,
                                       partials.mutable_data_ptr<at::opmath_type<scalar_t>>(), rows, x.size(1),
                                       x.size(2), kernel_size, kChunkRows};
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) { depthwise_weight_grad_chunks_best(args, b, e); });
  });
  at::Tensor total = at::zeros({kernel_size, x.size(2)}, partials.options());
  for (int64_t chunk = 0; chunk < chunks; ++chunk) total.add_(partials[chunk]);  // in chunk order
  return total.to(x.scalar_type());
}

// LayerNorm(dropout(x) + residual) per row of C channels, forward and backward. The mask is recomputed from
// (seed, index) in both passes; the hash loop is branch-free so that the multi-versioned clones vectorise it.
template <typename scalar_t>
struct NormArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* residual;
  const scalar_t* weight;
  const scalar_t* bias;        // forward only
  const scalar_t* grad;        // backward only
  scalar_t* out;               // forward: the output; backward: d(x)
  scalar_t* grad_residual;     // backward only
  acc_t* mean;                 // [rows]: written by the forward, read by the backward
  acc_t* rstd;
  acc_t* grad_times_xhat;      // backward: [rows, C], summed over rows by the caller for d(weight)
  int64_t channels;
  uint64_t seed;
  uint32_t threshold;
  acc_t scale;
  double eps;
};

// m[c] = scale if element base + c is kept, else 0
template <typename acc_t>
inline void dropout_multipliers(uint64_t seed, uint64_t base, uint32_t threshold, acc_t scale, acc_t* __restrict__ m,
                                int64_t n) {
  for (int64_t c = 0; c < n; ++c) m[c] = static_cast<acc_t>(dropout_keeps(seed, base + c, threshold)) * scale;
}

// A fixed-order sum in fp64 over 8 interleaved partial sums: vectorisable, and the same bits for any threads.
template <typename acc_t>
inline double row_sum(const acc_t* __restrict__ v, int64_t n) {
  double partial[8] = {};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int i = 0; i < 8; ++i) partial[i] += static_cast<double>(v[c + i]);
  for (; c < n; ++c) partial[0] += static_cast<double>(v[c]);
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

template <typename scalar_t>
void norm_forward_rows(const NormArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = a.channels;
  const scalar_t* __restrict__ x = a.x;  // restrict: lets the compiler vectorise without alias checks
  const scalar_t* __restrict__ residual = a.residual;
  const scalar_t* __restrict__ weight = a.weight;
  const scalar_t* __restrict__ bias = a.bias;
  scalar_t* __restrict__ out = a.out;
  std::vector<acc_t> h_buffer(n), m_buffer(n), d_buffer(n);
  acc_t* __restrict__ h = h_buffer.data();
  acc_t* __restrict__ m = m_buffer.data();
  acc_t* __restrict__ d = d_buffer.data();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * n;
    dropout_multipliers(a.seed, static_cast<uint64_t>(base), a.threshold, a.scale, m, n);
    for (int64_t c = 0; c < n; ++c) h[c] = static_cast<acc_t>(x[base + c]) * m[c] + static_cast<acc_t>(residual[base + c]);
    const acc_t mu = static_cast<acc_t>(row_sum(h, n) / n);
    for (int64_t c = 0; c < n; ++c) d[c] = (h[c] - mu) * (h[c] - mu);
    const acc_t inv = static_cast<acc_t>(1.0 / std::sqrt(row_sum(d, n) / n + a.eps));
    for (int64_t c = 0; c < n; ++c)
      out[base + c] = static_cast<scalar_t>((h[c] - mu) * inv * static_cast<acc_t>(weight[c]) + static_cast<acc_t>(bias[c]));
    a.mean[row] = mu;
    a.rstd[row] = inv;
  }
}

// d(h) = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = grad * weight; d(x) = d(h) * m, d(residual) = d(h)
template <typename scalar_t>
void norm_backward_rows(const NormArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = a.channels;
  const scalar_t* __restrict__ x = a.x;
  const scalar_t* __restrict__ residual = a.residual;
  const scalar_t* __restrict__ weight = a.weight;
  const scalar_t* __restrict__ grad = a.grad;
  scalar_t* __restrict__ grad_x = a.out;
  scalar_t* __restrict__ grad_residual = a.grad_residual;
  acc_t* __restrict__ grad_times_xhat = a.grad_times_xhat;
  std::vector<acc_t> buffers(4 * n);
  acc_t* __restrict__ m = buffers.data();
  acc_t* __restrict__ xhat = m + n;
  acc_t* __restrict__ g = xhat + n;
  acc_t* __restrict__ g_xhat = g + n;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * n;
    const acc_t mu = a.mean[row], inv = a.rstd[row];
    dropout_multipliers(a.seed, static_cast<uint64_t>(base), a.threshold, a.scale, m, n);
    for (int64_t c = 0; c < n; ++c) {
      const acc_t h = static_cast<acc_t>(x[base + c]) * m[c] + static_cast<acc_t>(residual[base + c]);
      xhat[c] = (h - mu) * inv;
      const acc_t go = static_cast<acc_t>(grad[base + c]);
      g[c] = go * static_cast<acc_t>(weight[c]);
      g_xhat[c] = g[c] * xhat[c];
      grad_times_xhat[base + c] = go * xhat[c];
    }
    const acc_t mean_g = static_cast<acc_t>(row_sum(g, n) / n);
    const acc_t mean_g_xhat = static_cast<acc_t>(row_sum(g_xhat, n) / n);
    for (int64_t c = 0; c < n; ++c) {
      const acc_t dh = inv * (g[c] - mean_g - xhat[c] * mean_g_xhat);
      grad_residual[base + c] = static_cast<scalar_t>(dh);
      grad_x[base + c] = static_cast<scalar_t>(dh * m[c]);
    }
  }
}

CONVBERT_FAST_CLONED(norm_forward_rows, NormArgs)
CONVBERT_FAST_CLONED(norm_backward_rows, NormArgs)

template <typename scalar_t>
NormArgs<scalar_t> norm_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double p,
                             double eps, int64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  NormArgs<scalar_t> args{};
  args.x = x.const_data_ptr<scalar_t>();
  args.residual = residual.const_data_ptr<scalar_t>();
  args.weight = weight.const_data_ptr<scalar_t>();
  args.channels = x.size(-1);
  args.seed = static_cast<uint64_t>(seed);
  args.threshold = dropout_threshold(p);
  args.scale = p < 1.0 ? static_cast<acc_t>(1.0 / (1.0 - p)) : acc_t(0);
  args.eps = eps;
  return args;
}

void norm_forward_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                      double p, double eps, int64_t seed, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  DISPATCH_FLOATS(x.scalar_type(), "dropout_add_layer_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    NormArgs<scalar_t> args = norm_args<scalar_t>(x, residual, weight, p, eps, seed);
    args.bias = bias.const_data_ptr<scalar_t>();
    args.out = out.mutable_data_ptr<scalar_t>();
    args.mean = mean.mutable_data_ptr<acc_t>();
    args.rstd = rstd.mutable_data_ptr<acc_t>();
    at::parallel_for(0, x.size(0), grain_for(8 * x.size(1)), [&](int64_t b, int64_t e) { norm_forward_rows_best(args, b, e); });
  });
}

void norm_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                       const at::Tensor& mean, const at::Tensor& rstd, double p, int64_t seed, at::Tensor& grad_x,
                       at::Tensor& grad_residual, at::Tensor& grad_times_xhat) {
  DISPATCH_FLOATS(x.scalar_type(), "dropout_add_layer_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    NormArgs<scalar_t> args = norm_args<scalar_t>(x, residual, weight, p, 0.0, seed);
    args.grad = grad.const_data_ptr<scalar_t>();
    args.out = grad_x.mutable_data_ptr<scalar_t>();
    args.grad_residual = grad_residual.mutable_data_ptr<scalar_t>();
    args.mean = const_cast<acc_t*>(mean.const_data_ptr<acc_t>());
    args.rstd = const_cast<acc_t*>(rstd.const_data_ptr<acc_t>());
    args.grad_times_xhat = grad_times_xhat.mutable_data_ptr<acc_t>();
    at::parallel_for(0, x.size(0), grain_for(8 * x.size(1)), [&](int64_t b, int64_t e) { norm_backward_rows_best(args, b, e); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(convbert_fast, CPU, m) {
  m.impl("dynamic_span_conv", &span_conv_cpu);
  m.impl("dynamic_span_conv_into", &span_conv_into_cpu);
  m.impl("dynamic_span_conv_backward", &span_conv_backward_cpu);
  m.impl("dynamic_span_conv_concat", [](const at::Tensor& prefix, const at::Tensor& values,
                                        const at::Tensor& kernel_logits, int64_t num_heads) {
    return dynamic_span_conv_concat(prefix, values, kernel_logits, num_heads, &span_conv_into_cpu);
  });
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
  m.impl("dropout_add_layer_norm", [](const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b,
                                      double p, double eps, const at::Tensor& seed) {
    return dropout_add_layer_norm(x, r, w, b, p, eps, seed, &norm_forward_cpu);
  });
  m.impl("dropout_add_layer_norm_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& r,
                                               const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rstd,
                                               double p, const at::Tensor& seed) {
    return dropout_add_layer_norm_backward(g, x, r, w, mean, rstd, p, seed, &norm_backward_cpu);
  });
}

}  // namespace convbert_fast
