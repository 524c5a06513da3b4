// The tiled (v2) CUDA kernels run on the CPU, against double-precision loops: their tiles, halos, rings, vector
// loads, reduce-scatters and block sums are the code under test, compiled by g++ (tests/test_emulated_kernels.py).
// A block's threads are std::threads; a warp's lanes meet at a barrier at every shuffle and __syncwarp, a block's
// at __syncthreads; blocks run one after another, so a kernel's static array is its block's shared memory.
// No GPU behaviour is claimed beyond that: timing, memory ordering and the real shuffle unit are not modelled.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;

struct Warp {
  std::barrier<> barrier{32};
  alignas(8) unsigned char slots[32][8];
};
thread_local Warp* this_warp;
thread_local std::barrier<>* this_block;

template <typename T>
T __shfl_xor_sync(unsigned, T value, int offset) {
  const unsigned lane = threadIdx.x & 31;
  std::memcpy(this_warp->slots[lane], &value, sizeof(T));
  this_warp->barrier.arrive_and_wait();
  T other;
  std::memcpy(&other, this_warp->slots[lane ^ offset], sizeof(T));
  this_warp->barrier.arrive_and_wait();
  return other;
}
inline void __syncwarp() { this_warp->barrier.arrive_and_wait(); }
inline void __syncthreads() { this_block->arrive_and_wait(); }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline double __hiloint2double(int hi, int lo) {
  const uint64_t bits = (static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo);
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
}
inline int __double2loint(double d) {
  uint64_t bits;
  std::memcpy(&bits, &d, 8);
  return static_cast<int>(static_cast<uint32_t>(bits));
}
inline int __double2hiint(double d) {
  uint64_t bits;
  std::memcpy(&bits, &d, 8);
  return static_cast<int>(static_cast<uint32_t>(bits >> 32));
}
using std::exp;
using std::fma;
using std::min;
using std::sqrt;

// the kernels of each .cu (their launchers are nvcc-only)
#include "../../csrc/cuda/dropout_add_layer_norm.cu"
#include "../../csrc/cuda/dynamic_span_conv.cu"
#include "../../csrc/cuda/separable_conv1d.cu"

using namespace convbert_fast;

// body() run by every thread of every block, blocks in order
void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
  blockDim = {block, 1, 1};
  gridDim = {grid, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> block_barrier(block);
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned w = 0; w < (block + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        this_warp = warps[t / 32].get();
        this_block = &block_barrier;
        body();
      });
    }
    for (auto& thread : threads) thread.join();
  }
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- data: values rounded to T, kept as T and as double
template <typename T>
T to_t(double v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(v));
  else return static_cast<T>(v);
}
template <typename T>
double to_d(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return static_cast<double>(v);
}
template <typename T>
struct Data {
  std::vector<T> t;
  std::vector<double> d;
  Data(size_t n, std::mt19937& rng, double scale = 1.0) : t(n), d(n) {
    std::normal_distribution<double> normal(0.0, scale);
    for (size_t i = 0; i < n; ++i) t[i] = to_t<T>(normal(rng)), d[i] = to_d(t[i]);
  }
};

int failures = 0;
// max |got - want| <= atol + rtol * max |want|, over the entries want[i] (got from T)
template <typename T>
void expect_close(const char* what, const std::vector<T>& got, const std::vector<double>& want, double rtol,
                  double atol = 0.0) {
  double worst = 0.0, scale = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, std::abs(want[i]));
    const double g = to_d(got[i]);
    worst = std::max(worst, std::isfinite(g) ? std::abs(g - want[i]) : INFINITY);
  }
  const bool ok = worst <= atol + rtol * scale;
  failures += !ok;
  std::printf("%-60s max err %.3g (scale %.3g, allowed %.3g) %s\n", what, worst, scale, atol + rtol * scale,
              ok ? "ok" : "FAIL");
}

// ---- span conv
template <typename T, bool Vector>
void span_conv_case(const char* name, int batch, int seq_len, int heads, int head_size, int out_pad, double rtol) {
  constexpr int K = 9, half = K / 2;
  std::mt19937 rng(17);
  const int width = heads * head_size, out_row = width + out_pad;
  Data<T> values(size_t(batch) * seq_len * width, rng), logits(size_t(batch) * seq_len * heads * K, rng, 2.0);
  Data<T> grad(size_t(batch) * seq_len * out_row, rng);  // read through the out strides, as the concat's slice
  // reference, in double
  std::vector<double> w(logits.d.size()), out_ref(size_t(batch) * seq_len * out_row, 0.0);
  std::vector<double> grad_values_ref(values.d.size(), 0.0), grad_logits_ref(logits.d.size(), 0.0);
  for (size_t task = 0; task < size_t(batch) * seq_len * heads; ++task) {
    const double* z = &logits.d[task * K];
    double top = z[0], total = 0;
    for (int j = 1; j < K; ++j) top = std::max(top, z[j]);
    for (int j = 0; j < K; ++j) total += std::exp(z[j] - top);
    for (int j = 0; j < K; ++j) w[task * K + j] = std::exp(z[j] - top) / total;
  }
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < seq_len; ++t)
      for (int h = 0; h < heads; ++h) {
        const size_t task = (size_t(b) * seq_len + t) * heads + h;
        double grad_w[K] = {}, dot = 0;
        for (int j = 0; j < K; ++j) {
          const int s = t + j - half;
          if (s < 0 || s >= seq_len) continue;
          for (int d = 0; d < head_size; ++d) {
            const size_t src = (size_t(b) * seq_len + s) * width + h * head_size + d;
            const size_t g = (size_t(b) * seq_len + t) * out_row + h * head_size + d;
            out_ref[g] += w[task * K + j] * values.d[src];
            grad_w[j] += grad.d[g] * values.d[src];
            grad_values_ref[src] += w[task * K + j] * grad.d[g];
          }
        }
        for (int j = 0; j < K; ++j) dot += w[task * K + j] * grad_w[j];
        for (int j = 0; j < K; ++j) grad_logits_ref[task * K + j] = w[task * K + j] * (grad_w[j] - dot);
      }
  // the kernels, with the launcher's geometry (csrc/cuda/dynamic_span_conv.cu)
  const int tiles = ceil_div(seq_len, kSpanTile), tasks = batch * heads * tiles, warps = span_tile_warps<T>();
  std::vector<T> out(out_ref.size(), to_t<T>(0.0)), grad_values(values.t.size()), grad_logits(logits.t.size());
  launch(ceil_div(tasks, warps), warps * 32, [&] {
    span_conv_forward_tiled_kernel<T, K, Vector>(values.t.data(), logits.t.data(), out.data(), tasks, tiles,
                                                 seq_len, heads, head_size, int64_t(seq_len) * out_row, out_row);
  });
  launch(ceil_div(tasks, warps), warps * 32, [&] {
    span_conv_backward_tiled_kernel<T, K, Vector>(grad.t.data(), values.t.data(), logits.t.data(),
                                                  grad_values.data(), grad_logits.data(), tasks, tiles, seq_len,
                                                  heads, head_size, int64_t(seq_len) * out_row, out_row);
  });
  // only the conv's columns of out are written: compare those
  std::vector<T> out_conv;
  std::vector<double> out_conv_ref;
  for (size_t row = 0; row < size_t(batch) * seq_len; ++row)
    for (int c = 0; c < out_row; ++c)
      if (c < width) out_conv.push_back(out[row * out_row + c]), out_conv_ref.push_back(out_ref[row * out_row + c]);
      else if (to_d(out[row * out_row + c]) != 0.0) ++failures, std::printf("%s: padding column written\n", name);
  char label[160];
  std::snprintf(label, sizeof label, "span conv fwd %s", name);
  expect_close(label, out_conv, out_conv_ref, rtol);
  std::snprintf(label, sizeof label, "span conv d(values) %s", name);
  expect_close(label, grad_values, grad_values_ref, rtol);
  std::snprintf(label, sizeof label, "span conv d(logits) %s", name);
  expect_close(label, grad_logits, grad_logits_ref, rtol);
}

// ---- depthwise conv
// rtol for the outputs in T; the weight gradient's partial sums stay in the accumulation type: fp32's tolerance
template <typename T, bool Vector>
void depthwise_case(const char* name, int batch, int seq_len, int channels, double rtol) {
  const double acc_rtol = std::is_same_v<T, double> ? 1e-13 : 2e-6;
  constexpr int K = 9, half = K / 2;
  using A = typename AccType<T>::type;
  std::mt19937 rng(18);
  Data<T> x(size_t(batch) * seq_len * channels, rng), taps(size_t(K) * channels, rng), grad(x.d.size(), rng);
  std::vector<double> out_ref(x.d.size(), 0.0), taps_grad_ref(taps.d.size(), 0.0);
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < seq_len; ++t)
      for (int j = 0; j < K; ++j) {
        const int s = t + j - half;
        if (s < 0 || s >= seq_len) continue;
        for (int c = 0; c < channels; ++c) {
          const size_t at = (size_t(b) * seq_len + t) * channels + c, src = (size_t(b) * seq_len + s) * channels + c;
          out_ref[at] += taps.d[size_t(j) * channels + c] * x.d[src];
          taps_grad_ref[size_t(j) * channels + c] += grad.d[at] * x.d[src];
        }
      }
  const int tiles = ceil_div(seq_len, kDepthwiseTile), groups = ceil_div(channels, 32 * kDepthwiseVec);
  const int tasks = batch * tiles * groups;
  std::vector<T> out(x.t.size());
  launch(ceil_div(tasks, kDepthwiseWarps), kDepthwiseWarps * 32, [&] {
    depthwise_conv_forward_tiled_kernel<T, K, Vector>(x.t.data(), taps.t.data(), out.data(), tasks, tiles, groups,
                                                      seq_len, channels);
  });
  const int chunks = ceil_div(seq_len, kWeightGradChunk), wg_groups = ceil_div(channels, 32 * kWeightGradVec);
  const int wg_tasks = batch * chunks * wg_groups;
  std::vector<A> partials(size_t(batch) * chunks * K * channels, A(NAN));
  launch(ceil_div(wg_tasks, kDepthwiseWarps), kDepthwiseWarps * 32, [&] {
    depthwise_conv_weight_grad_tiled_kernel<T, K, Vector>(grad.t.data(), x.t.data(), partials.data(), wg_tasks,
                                                          chunks, wg_groups, seq_len, channels);
  });
  std::vector<double> taps_grad(taps.d.size(), 0.0);  // summed over chunks, as the glue does
  for (size_t chunk = 0; chunk < size_t(batch) * chunks; ++chunk)
    for (size_t i = 0; i < taps_grad.size(); ++i) taps_grad[i] += partials[chunk * taps_grad.size() + i];
  char label[160];
  std::snprintf(label, sizeof label, "depthwise fwd %s", name);
  expect_close(label, out, out_ref, rtol);
  std::snprintf(label, sizeof label, "depthwise d(taps) %s", name);
  expect_close(label, taps_grad, taps_grad_ref, acc_rtol);
}

// ---- dropout + residual + LayerNorm
bool reference_keeps(uint64_t seed, uint64_t index, uint32_t threshold) {  // splitmix64, as documented
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40) >= threshold;
}

template <typename T, int NV, bool Dropout>
void layer_norm_case(const char* name, int rows, int channels, double p, double rtol) {
  using A = typename AccType<T>::type;
  const double acc_rtol = std::is_same_v<T, double> ? 1e-12 : 2e-6;  // d(weight), d(bias): sums in A
  std::mt19937 rng(19);
  const uint64_t seed = 0x123456789abcdefull;
  const double eps = 1e-5, scale = p < 1 ? 1 / (1 - p) : 0;
  const uint32_t threshold = dropout_threshold(p);
  Data<T> x(size_t(rows) * channels, rng), residual(x.d.size(), rng), grad(x.d.size(), rng);
  Data<T> weight(channels, rng), bias(channels, rng);
  std::vector<double> out_ref(x.d.size()), gx_ref(x.d.size()), gr_ref(x.d.size()), dw_ref(channels, 0.0),
      db_ref(channels, 0.0);
  for (int r = 0; r < rows; ++r) {
    std::vector<double> h(channels), xhat(channels);
    std::vector<bool> keep(channels);
    double mu = 0, var = 0, mg = 0, mgx = 0;
    for (int c = 0; c < channels; ++c) {
      const size_t i = size_t(r) * channels + c;
      keep[c] = reference_keeps(seed, i, threshold);
      h[c] = (keep[c] ? x.d[i] * scale : 0.0) + residual.d[i];
      mu += h[c] / channels;
    }
    for (int c = 0; c < channels; ++c) var += (h[c] - mu) * (h[c] - mu) / channels;
    const double inv = 1 / std::sqrt(var + eps);
    for (int c = 0; c < channels; ++c) {
      const size_t i = size_t(r) * channels + c;
      xhat[c] = (h[c] - mu) * inv;
      out_ref[i] = xhat[c] * weight.d[c] + bias.d[c];
      mg += grad.d[i] * weight.d[c] / channels;
      mgx += grad.d[i] * weight.d[c] * xhat[c] / channels;
      dw_ref[c] += grad.d[i] * xhat[c];
      db_ref[c] += grad.d[i];
    }
    for (int c = 0; c < channels; ++c) {
      const size_t i = size_t(r) * channels + c;
      gr_ref[i] = inv * (grad.d[i] * weight.d[c] - mg - xhat[c] * mgx);
      gx_ref[i] = keep[c] ? gr_ref[i] * scale : 0.0;
    }
  }
  std::vector<T> out(x.t.size()), gx(x.t.size()), gr(x.t.size());
  std::vector<A> mean(rows), rstd(rows);
  launch(ceil_div(rows, kNormWarps * kNormForwardRows), kNormWarps * 32, [&] {
    dropout_add_layer_norm_forward_tiled_kernel<T, NV, Dropout>(
        x.t.data(), residual.t.data(), weight.t.data(), bias.t.data(), out.data(), mean.data(), rstd.data(), rows,
        channels, seed, threshold, static_cast<A>(scale), static_cast<A>(eps));
  });
  const int blocks = ceil_div(rows, kNormWarps * kNormBackwardRows);
  std::vector<A> wp(size_t(blocks) * channels, A(NAN)), bp(size_t(blocks) * channels, A(NAN));
  launch(blocks, kNormWarps * 32, [&] {
    dropout_add_layer_norm_backward_tiled_kernel<T, NV, Dropout>(
        grad.t.data(), x.t.data(), residual.t.data(), weight.t.data(), mean.data(), rstd.data(), gx.data(),
        gr.data(), wp.data(), bp.data(), rows, channels, seed, threshold, static_cast<A>(scale));
  });
  std::vector<double> dw(channels, 0.0), db(channels, 0.0);
  for (int k = 0; k < blocks; ++k)
    for (int c = 0; c < channels; ++c) dw[c] += wp[size_t(k) * channels + c], db[c] += bp[size_t(k) * channels + c];
  char label[160];
  std::snprintf(label, sizeof label, "LayerNorm fwd %s", name);
  expect_close(label, out, out_ref, rtol);
  std::snprintf(label, sizeof label, "LayerNorm d(x) %s", name);
  expect_close(label, gx, gx_ref, rtol);
  std::snprintf(label, sizeof label, "LayerNorm d(residual) %s", name);
  expect_close(label, gr, gr_ref, rtol);
  std::snprintf(label, sizeof label, "LayerNorm d(weight) %s", name);
  expect_close(label, dw, dw_ref, acc_rtol);
  std::snprintf(label, sizeof label, "LayerNorm d(bias) %s", name);
  expect_close(label, db, db_ref, acc_rtol);
}

// the GPU's 32-bit form of the dropout hash (csrc/dropout_mask.h) against splitmix64, around each decision's threshold
void dropout_words_case() {
  std::mt19937_64 rng(20);
  long long mismatches = 0, checked = 0;
  for (int i = 0; i < 2000000; ++i) {
    const uint64_t z = i < 1000 ? (i < 500 ? uint64_t(i) : ~uint64_t(0) - i) : rng();
    uint64_t mixed = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    mixed = (mixed ^ (mixed >> 27)) * 0x94D049BB133111EBull;
    const uint32_t top = static_cast<uint32_t>((mixed ^ (mixed >> 31)) >> 40);
    for (uint32_t threshold : {0u, top, top + 1, top > 0 ? top - 1 : 0u, 1u << 24}) {
      const bool want = top >= threshold;
      mismatches += dropout_keeps_words(static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32), threshold) != want;
      ++checked;
    }
  }
  failures += mismatches != 0;
  std::printf("%-60s %lld of %lld decisions differ %s\n", "dropout hash, 32-bit words", mismatches, checked,
              mismatches ? "FAIL" : "ok");
}

int main() {
  dropout_words_case();
  // fp32: errors of fp32 accumulation (~1e-6 relative); bf16: the output's rounding (2^-8) on top
  span_conv_case<float, true>("fp32 D=64 L=70 vector", 2, 70, 3, 64, 0, 2e-6);
  span_conv_case<float, true>("fp32 D=40 L=33 vector, out rows padded by 8", 2, 33, 2, 40, 8, 2e-6);
  span_conv_case<float, false>("fp32 D=38 L=70 scalar, out rows padded by 6", 1, 70, 2, 38, 6, 2e-6);
  span_conv_case<__nv_bfloat16, true>("bf16 D=64 L=130 vector", 1, 130, 2, 64, 0, 8e-3);
  span_conv_case<double, true>("fp64 D=64 L=5 vector", 1, 5, 2, 64, 0, 1e-13);
  depthwise_case<float, true>("fp32 C=200 L=70 vector", 2, 70, 200, 2e-6);
  depthwise_case<float, false>("fp32 C=198 L=300 scalar", 1, 300, 198, 2e-6);
  depthwise_case<__nv_bfloat16, true>("bf16 C=256 L=40 vector", 2, 40, 256, 8e-3);
  layer_norm_case<float, 2, true>("fp32 C=200 rows=37 p=0.3", 37, 200, 0.3, 2e-6);
  layer_norm_case<float, 1, false>("fp32 C=128 rows=40 p=0", 40, 128, 0.0, 2e-6);
  layer_norm_case<__nv_bfloat16, 3, true>("bf16 C=768 rows=9 p=0.1", 9, 768, 0.1, 8e-3);
  layer_norm_case<double, 4, true>("fp64 C=256 rows=33 p=0.5", 33, 256, 0.5, 1e-12);
  std::printf("%d failure(s)\n", failures);
  return failures != 0;
}
