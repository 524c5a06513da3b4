// separable_conv1d on the CPU: the depthwise conv's kernels on the [B, L, C] layout, inside the GEMMs of
// composite.cpp.
#include "../composite.h"
#include "common.h"

namespace convbert_fast {
namespace {

// out[i] = sum_r taps[r][i] * rows[r][i] for i < n (a per-channel weight: the depthwise conv). Wider tiles
// than the span conv's: several independent accumulator chains per tap hide the FMA latency.
constexpr int64_t kChannelTile = 64;

template <typename scalar_t, int kBytes, typename acc_t = at::opmath_type<scalar_t>>
inline void tapped_row_sum(const scalar_t* const* rows, const scalar_t* const* taps, int64_t count, scalar_t* out,
                           int64_t n) {
  using T = Tile<acc_t, kBytes>;
  constexpr int64_t kTiles = kChannelTile / kTile;
  int64_t i0 = 0;
  for (; i0 + kChannelTile <= n; i0 += kChannelTile) {
    T acc[kTiles], x, w;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // tiles q and q + 1: the even and odd channels
      T x_odd, w_odd;
      for (int64_t r = 0; r < count; ++r) {
        for (int64_t q = 0; q < kTiles; q += 2) {
          load_pairs(rows[r] + i0 + q * kTile, x, x_odd);
          load_pairs(taps[r] + i0 + q * kTile, w, w_odd);
          acc[q].add(w, x);
          acc[q + 1].add(w_odd, x_odd);
        }
      }
      for (int64_t q = 0; q < kTiles; q += 2) store_pairs(acc[q], acc[q + 1], out + i0 + q * kTile);
    } else {
      for (int64_t r = 0; r < count; ++r) {
        for (int64_t q = 0; q < kTiles; ++q) {
          x.load(rows[r] + i0 + q * kTile);
          w.load(taps[r] + i0 + q * kTile);
          acc[q].add(w, x);
        }
      }
      for (int64_t q = 0; q < kTiles; ++q) acc[q].store(out + i0 + q * kTile);
    }
  }
  if (i0 < n) {
    const int64_t len = n - i0;
    acc_t acc[kChannelTile] = {};
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* __restrict__ src = rows[r] + i0;
      const scalar_t* __restrict__ tap = taps[r] + i0;
      for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<acc_t>(tap[i]) * static_cast<acc_t>(src[i]);
    }
    for (int64_t i = 0; i < len; ++i) out[i0 + i] = static_cast<scalar_t>(acc[i]);
  }
}

template <typename scalar_t>
struct DepthwiseArgs {
  const scalar_t* x;
  const scalar_t* taps_or_grad;  // forward: taps [K, C]; weight gradient: d(out) [B, L, C]
  scalar_t* out;
  at::opmath_type<scalar_t>* partials;  // weight gradient: [chunks, K, C]
  Sequences sequences;  // the taps of a row reach only rows of its own sequence
  int64_t rows, channels, kernel_size, chunk_rows;
};

// out[b, t, c] = sum_j taps[j, c] * x[b, t + j - K/2, c]
template <typename scalar_t, int kBytes>
void depthwise_forward_rows(const DepthwiseArgs<scalar_t>& a, int64_t begin, int64_t end) {
  const int64_t half = a.kernel_size / 2;
  std::vector<const scalar_t*> rows(a.kernel_size), tap_rows(a.kernel_size);
  for (int64_t row = begin; row < end; ++row) {
    const auto [t, length] = a.sequences.locate(row);
    const int64_t first = std::max<int64_t>(0, half - t), last = std::min(a.kernel_size, length + half - t);
    for (int64_t j = first; j < last; ++j) {
      rows[j] = a.x + (row + j - half) * a.channels;
      tap_rows[j] = a.taps_or_grad + j * a.channels;
    }
    tapped_row_sum<scalar_t, kBytes>(rows.data() + first, tap_rows.data() + first, last - first,
                                    a.out + row * a.channels, a.channels);
  }
}

// partials[chunk, j, c] = sum over the chunk's rows (b, t) of grad[b, t, c] * x[b, t + j - K/2, c]
template <typename scalar_t, int /*kBytes: the loop over channels vectorises as it is*/>
void depthwise_weight_grad_chunks(const DepthwiseArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = a.kernel_size / 2, C = a.channels;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    acc_t* part = a.partials + chunk * a.kernel_size * C;
    std::fill(part, part + a.kernel_size * C, acc_t(0));
    for (int64_t row = chunk * a.chunk_rows; row < std::min(a.rows, (chunk + 1) * a.chunk_rows); ++row) {
      const auto [t, length] = a.sequences.locate(row);
      const int64_t first = std::max<int64_t>(0, half - t), last = std::min(a.kernel_size, length + half - t);
      const scalar_t* __restrict__ g = a.taps_or_grad + row * C;
      for (int64_t j = first; j < last; ++j) {
        const scalar_t* __restrict__ in = a.x + (row + j - half) * C;
        acc_t* __restrict__ p = part + j * C;
        for (int64_t c = 0; c < C; ++c) p[c] += static_cast<acc_t>(g[c]) * static_cast<acc_t>(in[c]);
      }
    }
  }
}

CONVBERT_FAST_CLONED(depthwise_forward_rows, DepthwiseArgs)
CONVBERT_FAST_CLONED(depthwise_weight_grad_chunks, DepthwiseArgs)

at::Tensor depthwise_cpu(const at::Tensor& x, const at::Tensor& taps, const at::Tensor& offsets) {
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0) * x.size(1);
  DISPATCH_FLOATS(x.scalar_type(), "depthwise_conv_cpu", [&] {
    const DepthwiseArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), taps.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), nullptr, Sequences(offsets, x.size(1)),
                                       rows, x.size(2), taps.size(0), 0};
    at::parallel_for(0, rows, grain_for(x.size(2) * taps.size(0)),
                     [&](int64_t b, int64_t e) { depthwise_forward_rows_best(args, b, e); });
  });
  return out;
}

// Fixed chunks of rows give partial sums that are added in chunk order: the same result for any number
// of threads.
at::Tensor depthwise_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size,
                                     const at::Tensor& offsets) {
  constexpr int64_t kChunkRows = 64;
  const at::Tensor g = grad.contiguous();
  const int64_t rows = x.size(0) * x.size(1), chunks = (rows + kChunkRows - 1) / kChunkRows;
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partials = at::empty({chunks, kernel_size, x.size(2)}, x.options().dtype(acc_dtype));
  DISPATCH_FLOATS(x.scalar_type(), "depthwise_conv_weight_grad_cpu", [&] {
    const DepthwiseArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), nullptr,
                                       partials.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                                       Sequences(offsets, x.size(1)), rows, x.size(2), kernel_size, kChunkRows};
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) { depthwise_weight_grad_chunks_best(args, b, e); });
  });
  at::Tensor total = at::zeros({kernel_size, x.size(2)}, partials.options());
  for (int64_t chunk = 0; chunk < chunks; ++chunk) total.add_(partials[chunk]);  // in chunk order
  return total.to(x.scalar_type());
}
}  // namespace

TORCH_LIBRARY_IMPL(convbert_fast, CPU, m) {
  m.impl("separable_conv1d", [](const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw, const at::Tensor& b,
                                const OptionalTensor& cu_seqlens) {
    return separable_conv1d(x, dw, pw, b, cu_seqlens, &depthwise_cpu);
  });
  m.impl("separable_conv1d_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw,
                                         const at::Tensor& pw, const at::Tensor& b, const OptionalTensor& cu_seqlens) {
    return separable_conv1d_backward(g, x, dw, pw, b, cu_seqlens, &depthwise_cpu, &depthwise_weight_grad_cpu);
  });
}

}  // namespace convbert_fast
