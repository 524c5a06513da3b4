// dropout_add_layer_norm on the CPU: the row kernels, inside the checks and reductions of composite.cpp; and dropout
// alone with the same mask.
#include "../composite.h"
#include "../dropout_mask.h"
#include "common.h"

namespace convbert_fast {
namespace {

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
  acc_t* weight_partials;      // backward: [chunks, C], each chunk's sums of grad * xhat: d(weight) summed by the caller
  acc_t* bias_partials;        // backward: [chunks, C], each chunk's sums of grad: d(bias)
  int64_t rows;                // backward: chunks of kNormChunkRows rows (the last one shorter)
  int64_t channels;
  uint64_t seed;
  uint32_t threshold;
  acc_t scale;
  double eps;
};

// m[c] = scale if element base + c is kept, else 0. A select, not bool * scale: GCC vectorises the hash only
// then (the AVX-512 clone hashes 8 elements per instruction; with the multiply the loop stayed scalar, ~1.7 ns
// an element on an AMD EPYC, two thirds of the forward).
template <typename acc_t>
inline void dropout_multipliers(uint64_t seed, uint64_t base, uint32_t threshold, acc_t scale, acc_t* __restrict__ m,
                                int64_t n) {
  if (threshold == 0) {  // no dropout (eval, or p = 0): every element kept, no hash (most of the row's work)
    std::fill(m, m + n, scale);
    return;
  }
  for (int64_t c = 0; c < n; ++c) m[c] = dropout_keeps(seed, base + c, threshold) ? scale : acc_t(0);
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

template <typename scalar_t, int /*kBytes: the loops over channels vectorise as they are*/>
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

// Rows per chunk of the backward: each chunk sums its rows' grad * xhat and grad per channel into one row of partial
// sums, which the caller adds in chunk order. Fixed chunks, so the same bits for any number of threads; no [rows, C]
// product tensor for ATen to sum afterwards.
constexpr int64_t kNormChunkRows = 32;

// d(h) = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = grad * weight; d(x) = d(h) * m, d(residual) = d(h)
template <typename scalar_t, int /*kBytes: the loops over channels vectorise as they are*/>
void norm_backward_chunks(const NormArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = a.channels;
  const scalar_t* __restrict__ x = a.x;
  const scalar_t* __restrict__ residual = a.residual;
  const scalar_t* __restrict__ weight = a.weight;
  const scalar_t* __restrict__ grad = a.grad;
  scalar_t* __restrict__ grad_x = a.out;
  scalar_t* __restrict__ grad_residual = a.grad_residual;
  std::vector<acc_t> buffers(4 * n);
  acc_t* __restrict__ m = buffers.data();
  acc_t* __restrict__ xhat = m + n;
  acc_t* __restrict__ g = xhat + n;
  acc_t* __restrict__ g_xhat = g + n;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    acc_t* __restrict__ weight_sums = a.weight_partials + chunk * n;
    acc_t* __restrict__ bias_sums = a.bias_partials + chunk * n;
    std::fill(weight_sums, weight_sums + n, acc_t(0));
    std::fill(bias_sums, bias_sums + n, acc_t(0));
    for (int64_t row = chunk * kNormChunkRows; row < std::min(a.rows, (chunk + 1) * kNormChunkRows); ++row) {
      const int64_t base = row * n;
      const acc_t mu = a.mean[row], inv = a.rstd[row];
      dropout_multipliers(a.seed, static_cast<uint64_t>(base), a.threshold, a.scale, m, n);
#pragma GCC ivdep  // the buffers are distinct (GCC's alias checks for this many streams keep it scalar otherwise)
      for (int64_t c = 0; c < n; ++c) {
        const acc_t h = static_cast<acc_t>(x[base + c]) * m[c] + static_cast<acc_t>(residual[base + c]);
        xhat[c] = (h - mu) * inv;
        const acc_t go = static_cast<acc_t>(grad[base + c]);
        g[c] = go * static_cast<acc_t>(weight[c]);
        g_xhat[c] = g[c] * xhat[c];
        weight_sums[c] += go * xhat[c];
        bias_sums[c] += go;
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
}

CONVBERT_FAST_CLONED(norm_forward_rows, NormArgs)
CONVBERT_FAST_CLONED(norm_backward_chunks, NormArgs)

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
  args.scale = dropout_scale<acc_t>(p);
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
                       at::Tensor& grad_residual, at::Tensor& weight_partials, at::Tensor& bias_partials) {
  const int64_t rows = x.size(0), chunks = (rows + kNormChunkRows - 1) / kNormChunkRows;
  weight_partials = at::empty({chunks, x.size(1)}, x.options().dtype(mean.scalar_type()));
  bias_partials = at::empty_like(weight_partials);
  DISPATCH_FLOATS(x.scalar_type(), "dropout_add_layer_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    NormArgs<scalar_t> args = norm_args<scalar_t>(x, residual, weight, p, 0.0, seed);
    args.grad = grad.const_data_ptr<scalar_t>();
    args.out = grad_x.mutable_data_ptr<scalar_t>();
    args.grad_residual = grad_residual.mutable_data_ptr<scalar_t>();
    args.mean = const_cast<acc_t*>(mean.const_data_ptr<acc_t>());
    args.rstd = const_cast<acc_t*>(rstd.const_data_ptr<acc_t>());
    args.weight_partials = weight_partials.mutable_data_ptr<acc_t>();
    args.bias_partials = bias_partials.mutable_data_ptr<acc_t>();
    args.rows = rows;
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) { norm_backward_chunks_best(args, b, e); });
  });
}

// dropout alone: out = x * m over blocks of kDropoutBlock elements of the flattened tensors, m as the rows' above.
template <typename scalar_t>
struct DropoutArgs {
  const scalar_t* x;
  scalar_t* out;
  int64_t numel;
  uint64_t seed;
  uint32_t threshold;
  at::opmath_type<scalar_t> scale;
};

constexpr int64_t kDropoutBlock = 2048;

template <typename scalar_t, int /*kBytes: the loops vectorise as they are*/>
void dropout_blocks(const DropoutArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x = a.x;
  scalar_t* __restrict__ out = a.out;
  acc_t m[kDropoutBlock];
  for (int64_t block = begin; block < end; ++block) {
    const int64_t first = block * kDropoutBlock, n = std::min(kDropoutBlock, a.numel - first);
    dropout_multipliers(a.seed, static_cast<uint64_t>(first), a.threshold, a.scale, m, n);
    for (int64_t i = 0; i < n; ++i) out[first + i] = static_cast<scalar_t>(static_cast<acc_t>(x[first + i]) * m[i]);
  }
}

CONVBERT_FAST_CLONED(dropout_blocks, DropoutArgs)

void dropout_cpu(const at::Tensor& x, double p, int64_t seed, at::Tensor& out) {
  const int64_t blocks = (x.numel() + kDropoutBlock - 1) / kDropoutBlock;
  DISPATCH_FLOATS(x.scalar_type(), "dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DropoutArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.numel(),
                                     static_cast<uint64_t>(seed), dropout_threshold(p),
                                     dropout_scale<acc_t>(p)};
    at::parallel_for(0, blocks, 4, [&](int64_t b, int64_t e) { dropout_blocks_best(args, b, e); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(convbert_fast, CPU, m) {
  m.impl("dropout", [](const at::Tensor& x, double p, const at::Tensor& seed) {
    return dropout_elements(x, p, seed, &dropout_cpu);
  });
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
