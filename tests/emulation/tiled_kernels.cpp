// The tiled (v2) CUDA kernels run on the CPU, against double-precision loops: their tiles, halos, rings, vector
// loads, reduce-scatters and block sums are the code under test, compiled by g++ (tests/test_emulated_kernels.py).
// A block's threads are std::threads; a warp's lanes meet at a barrier at every shuffle and __syncwarp, a block's
// at __syncthreads; blocks run one after another, so a kernel's static array is its block's shared memory.
// No GPU behaviour is claimed beyond that: timing, memory ordering and the real shuffle unit are not modelled.
// What the barriers would hide is checked instead: the 32 lanes of a meeting must come from one call site (divergent
// lanes reaching a shuffle or __syncwarp from two lines are undefined behaviour on a GPU), and, built with
// -fsanitize=thread, a shared-memory read of another lane's write with no meeting between them is a race report
// (the barriers give happens-before; --drop-syncwarp plants a missing __syncwarp to show it).
// Run modes: no argument, every case; --one-case, one span conv case (fp32, v2 and v1: the ThreadSanitizer run);
// --drop-syncwarp KERNEL, the __syncwarp()s called directly in KERNEL do nothing; --planted-divergence, a planted
// kernel whose lanes meet from two lines, which must be reported.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <source_location>
#include <string>
#include <thread>
#include <type_traits>
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
  std::source_location sites[32];  // where each lane called the shuffle or __syncwarp of this meeting
};
thread_local Warp* this_warp;
thread_local std::barrier<>* this_block;

std::string running_case;                 // named in a report; set before a case's launches
std::atomic<int> divergent_meetings{0};   // counted as failures at the end
const char* dropped_syncwarp = nullptr;   // --drop-syncwarp: "KERNEL(", whose own __syncwarp()s do nothing

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}
// The first barrier of a meeting: each lane leaves its call site; lane 0 then compares them (the sites stay put
// until the meeting's second barrier). A call from a helper (warp_sum) names the helper's line: divergence one
// level up, two call sites of one helper, is not seen.
void meet(const std::source_location& site) {
  const unsigned lane = threadIdx.x & 31;
  this_warp->sites[lane] = site;
  this_warp->barrier.arrive_and_wait();
  if (lane != 0) return;
  for (unsigned other = 1; other < 32; ++other) {
    const std::source_location& there = this_warp->sites[other];
    if (same_site(site, there)) continue;
    if (divergent_meetings.fetch_add(1) < 10) {
      std::printf("DIVERGENT: %s, block %u warp %u: lane 0 at %s:%u (%s) met lane %u at %s:%u (%s)\n",
                  running_case.c_str(), blockIdx.x + blockIdx.y * gridDim.x, threadIdx.x / 32, site.file_name(),
                  site.line(), site.function_name(), other, there.file_name(), there.line(), there.function_name());
    }
    return;
  }
}

[[noreturn]] void unemulated_width(int width, const std::source_location& site) {
  std::printf("FAIL: a shuffle of width %d at %s:%u is not emulated\n", width, site.file_name(), site.line());
  std::fflush(stdout);
  std::abort();
}
// CUDA's signatures (width defaults to warpSize) with the call site as a defaulted last parameter
template <typename T>
T __shfl_xor_sync(unsigned, T value, int offset, int width = 32,
                  std::source_location site = std::source_location::current()) {
  if (width != 32) unemulated_width(width, site);
  const unsigned lane = threadIdx.x & 31;
  std::memcpy(this_warp->slots[lane], &value, sizeof(T));
  meet(site);
  T other;
  std::memcpy(&other, this_warp->slots[lane ^ offset], sizeof(T));
  this_warp->barrier.arrive_and_wait();
  return other;
}
template <typename T>
T __shfl_sync(unsigned, T value, int source, int width = 32,
              std::source_location site = std::source_location::current()) {
  if (width != 32) unemulated_width(width, site);
  const unsigned lane = threadIdx.x & 31;
  std::memcpy(this_warp->slots[lane], &value, sizeof(T));
  meet(site);
  T other;
  std::memcpy(&other, this_warp->slots[source & 31], sizeof(T));
  this_warp->barrier.arrive_and_wait();
  return other;
}
inline void __syncwarp(unsigned = 0xffffffffu, std::source_location site = std::source_location::current()) {
  if (dropped_syncwarp && std::strstr(site.function_name(), dropped_syncwarp)) return;  // planted: no meeting
  meet(site);
  this_warp->barrier.arrive_and_wait();  // lane 0 has read the sites
}
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
inline double __longlong_as_double(long long bits) {
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
}
inline long long __double_as_longlong(double d) {
  long long bits;
  std::memcpy(&bits, &d, 8);
  return bits;
}
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
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

// A GPU faults on a misaligned vector access, x86 does not: the vector loads and stores (common.cuh) trap here.
[[noreturn]] void misaligned_vector(const void* p, int bytes) {
  std::printf("TRAP: a %d-byte vector access at %p, not %d-byte aligned (a GPU faults here)\n", bytes, p, bytes);
  std::fflush(stdout);
  std::abort();
}
#define CONVBERT_FAST_VECTOR_ALIGNED(pointer, bytes) \
  if (reinterpret_cast<uintptr_t>(pointer) % (bytes) != 0) misaligned_vector(pointer, bytes)

// the kernels of each .cu (their launchers are nvcc-only)
#include "../../csrc/cuda/dropout_add_layer_norm.cu"
#include "../../csrc/cuda/dynamic_span_conv.cu"
#include "../../csrc/cuda/separable_conv1d.cu"

using namespace convbert_fast;

// body() run by every thread of every block, blocks in order: one std::thread per thread of a block, kept for every
// block of the launch (a barrier between blocks), since creating threads is most of the emulation's time
void launch(Dim3 grid, unsigned block, const std::function<void()>& body) {
  blockDim = {block, 1, 1};
  gridDim = grid;
  std::barrier<> block_barrier(block), block_done(block);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned w = 0; w < (block + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      this_warp = warps[t / 32].get();
      this_block = &block_barrier;
      for (unsigned b = 0; b < grid.x * grid.y; ++b) {
        blockIdx = {b % grid.x, b / grid.x, 0};
        body();
        block_done.arrive_and_wait();
      }
    });
  }
  for (auto& thread : threads) thread.join();
}
void launch(unsigned grid, unsigned block, const std::function<void()>& body) { launch(Dim3{grid, 1, 1}, block, body); }

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
// Device memory as the CUDA caching allocator hands it out: 512-byte aligned (std::vector's 16 bytes would not let
// fp64 take vectors of 32 bytes), and sized exactly (AddressSanitizer sees a read past the end)
template <typename T>
struct DeviceAllocator {
  using value_type = T;
  DeviceAllocator() = default;
  template <typename U>
  DeviceAllocator(const DeviceAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(512))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(512)); }
  bool operator==(const DeviceAllocator&) const { return true; }
};
template <typename T>
using Buffer = std::vector<T, DeviceAllocator<T>>;

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return DType::BFloat16;
  else if constexpr (std::is_same_v<T, __half>) return DType::Float16;
  else if constexpr (std::is_same_v<T, double>) return DType::Float64;
  else return DType::Float32;
}
template <typename T>
struct Data {
  Buffer<T> t;
  std::vector<double> d;
  Data(size_t n, std::mt19937& rng, double scale = 1.0) : t(n), d(n) {
    std::normal_distribution<double> normal(0.0, scale);
    for (size_t i = 0; i < n; ++i) t[i] = to_t<T>(normal(rng)), d[i] = to_d(t[i]);
  }
};

int failures = 0;

// max |got - want| <= atol + rtol * max |want|, over the entries want[i] (got from T)
template <typename T>
void expect_close(const char* what, const T& got, const std::vector<double>& want, double rtol,
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

// ---- the rows of the convs: `batch` rows of seq_len, each a sequence; or one packed row of sequences (cu_seqlens)
struct Layout {
  int batch, seq_len;
  std::vector<int32_t> offsets;  // packed: [N + 1]; empty: batch rows
  static Layout rows(int batch, int seq_len) { return {batch, seq_len, {}}; }
  static Layout packed(std::initializer_list<int> lengths) {
    Layout layout{1, 0, {0}};
    for (int length : lengths) layout.offsets.push_back(layout.seq_len += length);
    return layout;
  }
  int total() const { return batch * seq_len; }
  const int32_t* device_offsets() const { return offsets.empty() ? nullptr : offsets.data(); }
  int sequences() const { return offsets.empty() ? 0 : static_cast<int>(offsets.size()) - 1; }
  // whether `row` lies in packed sequence `s` (-1: none)
  bool in_sequence(int row, int s) const { return s >= 0 && row >= offsets[s] && row < offsets[s + 1]; }
  // [lo, hi): the rows of `row`'s sequence
  std::pair<int, int> sequence(int row) const {
    if (offsets.empty()) return {row / seq_len * seq_len, (row / seq_len + 1) * seq_len};
    const int s = static_cast<int>(std::upper_bound(offsets.begin(), offsets.end(), row) - offsets.begin()) - 1;
    return {offsets[s], offsets[s + 1]};
  }
};

// the entries of rows not in `poisoned` (a packed sequence whose inputs are NaN), `width` entries a row
template <typename Container>
Container outside(const Container& v, int width, const Layout& layout, int poisoned) {
  Container kept;
  for (size_t i = 0; i < v.size(); ++i)
    if (!layout.in_sequence(static_cast<int>(i / width), poisoned)) kept.push_back(v[i]);
  return kept;
}

// kernel<KS>(...) with the launchers' choice of KS: 9 unrolled, 0 generic
#define WITH_KS(K, KS_NAME, ...)      \
  if ((K) == 9) {                     \
    constexpr int KS_NAME = 9;        \
    __VA_ARGS__;                      \
  } else {                            \
    constexpr int KS_NAME = 0;        \
    __VA_ARGS__;                      \
  }

// ---- span conv: v2 (K = 9) and v1 on the same data, each against the double-precision loops
// out_pad > 0: the output, the gradient and the values are rows of a wider tensor (the concat's slice, the fused
// projection's slice), the padding columns of values NaN: read through their strides, and those never read.
// poisoned >= 0: that packed sequence's values are NaN, and only the other rows are compared: a neighbour's NaN
// must not reach them. (Its gradient stays finite: the tiled backward lets a non-finite gradient row reach d(values)
// of the K/2 rows beside it, by design; csrc/cuda/dynamic_span_conv.cu says why.)
template <typename T, bool Vector>
void span_conv_case(const char* name, const Layout& layout, int heads, int head_size, int K, int out_pad,
                    double rtol, int poisoned = -1) {
  using A = typename AccType<T>::type;
  const int half = K / 2, rows = layout.total(), seq_len = layout.seq_len, batch = layout.batch;
  running_case = std::string("span conv ") + name;
  std::mt19937 rng(17);
  const int width = heads * head_size, out_row = width + out_pad, values_row = out_row;
  Data<T> values(size_t(rows) * values_row, rng), logits(size_t(rows) * heads * K, rng, 2.0);
  Data<T> grad(size_t(rows) * out_row, rng);  // read through the out strides, as the concat's slice
  for (int row = 0; row < rows; ++row) {
    for (int c = 0; c < values_row; ++c) {
      if (c >= width || layout.in_sequence(row, poisoned)) {
        values.t[size_t(row) * values_row + c] = to_t<T>(NAN), values.d[size_t(row) * values_row + c] = NAN;
      }
    }
  }
  // reference, in double
  std::vector<double> w(logits.d.size()), out_ref(size_t(rows) * out_row, 0.0);
  std::vector<double> grad_values_ref(size_t(rows) * width, 0.0), grad_logits_ref(logits.d.size(), 0.0);
  for (size_t task = 0; task < size_t(rows) * heads; ++task) {
    const double* z = &logits.d[task * K];
    double top = z[0], total = 0;
    for (int j = 1; j < K; ++j) top = std::max(top, z[j]);
    for (int j = 0; j < K; ++j) total += std::exp(z[j] - top);
    for (int j = 0; j < K; ++j) w[task * K + j] = std::exp(z[j] - top) / total;
  }
  for (int row = 0; row < rows; ++row) {
    const auto [lo, hi] = layout.sequence(row);
    for (int h = 0; h < heads; ++h) {
      const size_t task = size_t(row) * heads + h;
      std::vector<double> grad_w(K, 0.0);
      double dot = 0;
      for (int j = 0; j < K; ++j) {
        const int s = row + j - half;
        if (s < lo || s >= hi) continue;
        for (int d = 0; d < head_size; ++d) {
          const size_t src = size_t(s) * values_row + h * head_size + d, g = size_t(row) * out_row + h * head_size + d;
          out_ref[g] += w[task * K + j] * values.d[src];
          grad_w[j] += grad.d[g] * values.d[src];
          grad_values_ref[size_t(s) * width + h * head_size + d] += w[task * K + j] * grad.d[g];
        }
      }
      for (int j = 0; j < K; ++j) dot += w[task * K + j] * grad_w[j];
      for (int j = 0; j < K; ++j) grad_logits_ref[task * K + j] = w[task * K + j] * (grad_w[j] - dot);
    }
  }
  std::vector<double> out_conv_ref;  // only the conv's columns of out are written: compare those
  for (size_t row = 0; row < size_t(rows); ++row)
    for (int c = 0; c < width; ++c) out_conv_ref.push_back(out_ref[row * out_row + c]);
  auto check = [&](const char* version, const Buffer<T>& out, const Buffer<T>& grad_values,
                   const Buffer<T>& grad_logits) {
    Buffer<T> out_conv;
    for (size_t row = 0; row < size_t(rows); ++row)
      for (int c = 0; c < out_row; ++c)
        if (c < width) out_conv.push_back(out[row * out_row + c]);
        else if (to_d(out[row * out_row + c]) != 0.0) ++failures, std::printf("%s: padding column written\n", name);
    char label[200];
    std::snprintf(label, sizeof label, "span conv %s fwd %s", version, name);
    expect_close(label, outside(out_conv, width, layout, poisoned), outside(out_conv_ref, width, layout, poisoned),
                 rtol);
    std::snprintf(label, sizeof label, "span conv %s d(values) %s", version, name);
    expect_close(label, outside(grad_values, width, layout, poisoned),
                 outside(grad_values_ref, width, layout, poisoned), rtol);
    std::snprintf(label, sizeof label, "span conv %s d(logits) %s", version, name);
    expect_close(label, outside(grad_logits, heads * K, layout, poisoned),
                 outside(grad_logits_ref, heads * K, layout, poisoned), rtol);
  };
  const int32_t* offsets = layout.device_offsets();
  const int sequences = layout.sequences();
  const int64_t out_batch = int64_t(seq_len) * out_row, values_batch = int64_t(seq_len) * values_row;
  // each kernel choice, through the launchers' own plans (csrc/cuda/plan.h): the tiled kernels where they apply
  // (K = 9 here; whatever the size: kTiled), and v1 the general ones
  for (const KernelChoice kernels : {KernelChoice::kTiled, KernelChoice::kV1}) {
    const SpanConvPlan plan =
        span_conv_plan(kernels, dtype_of<T>(), batch, seq_len, heads, head_size, K, out_row, false);
    Buffer<T> out(out_ref.size(), to_t<T>(0.0)), grad_values(size_t(rows) * width), grad_logits(logits.t.size());
    if (plan.tiled) {
      // the launchers' vector choice (plan.h) must be this case's
      const bool forward_vectors = span_forward_vectors(sizeof(T), values.t.data(), out.data(), head_size,
                                                        values_batch, values_row, out_batch, out_row);
      const bool backward_vectors = span_backward_vectors(sizeof(T), grad.t.data(), values.t.data(),
                                                          grad_values.data(), head_size, values_batch, values_row,
                                                          out_batch, out_row);
      if (forward_vectors != Vector || backward_vectors != Vector) {
        ++failures;
        std::printf("span conv %s: the plans chose vectors %d/%d\n", name, forward_vectors, backward_vectors);
      }
      auto run = [&](auto packed) {
        constexpr bool Packed = decltype(packed)::value;
        launch(plan.blocks, plan.threads, [&] {
          span_conv_forward_tiled_kernel<T, 9, Vector, Packed>(values.t.data(), logits.t.data(), out.data(),
                                                               plan.tasks, plan.tiles, seq_len, heads, head_size,
                                                               values_batch, values_row, out_batch, out_row, offsets,
                                                               sequences);
        });
        launch(plan.blocks, plan.threads, [&] {
          span_conv_backward_tiled_kernel<T, 9, Vector, Packed>(grad.t.data(), values.t.data(), logits.t.data(),
                                                                grad_values.data(), grad_logits.data(), plan.tasks,
                                                                plan.tiles, seq_len, heads, head_size, values_batch,
                                                                values_row, out_batch, out_row, offsets, sequences);
        });
      };
      if (offsets) run(std::true_type{});
      else run(std::false_type{});
      check("v2", out, grad_values, grad_logits);
      continue;
    }
    // v1: the backward reads a contiguous gradient (the glue makes one) and keeps the weights between its passes
    Buffer<T> grad_dense(size_t(rows) * width);
    for (size_t row = 0; row < size_t(rows); ++row)
      for (int c = 0; c < width; ++c) grad_dense[row * width + c] = grad.t[row * out_row + c];
    Buffer<A> weights(logits.t.size());
    auto run = [&](auto packed) {
      constexpr bool Packed = decltype(packed)::value;
      WITH_KS(K, KS,
        launch(plan.blocks, plan.threads, [&] {
          span_conv_forward_kernel<T, KS, Packed>(values.t.data(), logits.t.data(), out.data(), batch, seq_len, heads,
                                                  head_size, K, values_batch, values_row, out_batch, out_row, offsets,
                                                  sequences);
        });
        launch(plan.blocks, plan.threads, [&] {
          span_conv_backward_logits_kernel<T, KS, Packed>(grad_dense.data(), values.t.data(), logits.t.data(),
                                                          grad_logits.data(), weights.data(), batch, seq_len, heads,
                                                          head_size, K, values_batch, values_row, offsets, sequences);
        });
        launch(plan.blocks, plan.threads, [&] {
          span_conv_backward_values_kernel<T, KS, Packed>(grad_dense.data(), weights.data(), grad_values.data(),
                                                          batch, seq_len, heads, head_size, K, offsets, sequences);
        }))
    };
    if (offsets) run(std::true_type{});
    else run(std::false_type{});
    check(kernels == KernelChoice::kV1 ? "v1" : "v1 (the tiled choice took it)", out, grad_values, grad_logits);
  }
}

// ---- depthwise conv, v2 (K = 9) and v1
// rtol for the outputs in T; the weight gradient's partial sums stay in the accumulation type: fp32's tolerance
template <typename T, bool Vector>
// poisoned >= 0: that packed sequence's x and gradient are NaN; the other rows' outputs are compared (d(taps), a
// sum over every row, is not).
void depthwise_case(const char* name, const Layout& layout, int channels, int K, double rtol, int poisoned = -1) {
  const double acc_rtol = std::is_same_v<T, double> ? 1e-13 : 2e-6;
  const int half = K / 2, rows = layout.total(), seq_len = layout.seq_len, batch = layout.batch;
  using A = typename AccType<T>::type;
  running_case = std::string("depthwise ") + name;
  std::mt19937 rng(18);
  Data<T> x(size_t(rows) * channels, rng), taps(size_t(K) * channels, rng), grad(x.d.size(), rng);
  for (size_t i = 0; i < x.t.size(); ++i) {
    if (!layout.in_sequence(static_cast<int>(i / channels), poisoned)) continue;
    x.t[i] = grad.t[i] = to_t<T>(NAN), x.d[i] = grad.d[i] = NAN;
  }
  std::vector<double> out_ref(x.d.size(), 0.0), taps_grad_ref(taps.d.size(), 0.0);
  for (int row = 0; row < rows; ++row) {
    const auto [lo, hi] = layout.sequence(row);
    for (int j = 0; j < K; ++j) {
      const int s = row + j - half;
      if (s < lo || s >= hi) continue;
      for (int c = 0; c < channels; ++c) {
        const size_t at = size_t(row) * channels + c, src = size_t(s) * channels + c;
        out_ref[at] += taps.d[size_t(j) * channels + c] * x.d[src];
        taps_grad_ref[size_t(j) * channels + c] += grad.d[at] * x.d[src];
      }
    }
  }
  auto check = [&](const char* version, const Buffer<T>& out, const Buffer<A>& partials) {
    std::vector<double> taps_grad(taps.d.size(), 0.0);  // summed over chunks, as the glue does
    for (size_t chunk = 0; chunk < partials.size() / taps_grad.size(); ++chunk)
      for (size_t i = 0; i < taps_grad.size(); ++i) taps_grad[i] += partials[chunk * taps_grad.size() + i];
    char label[200];
    std::snprintf(label, sizeof label, "depthwise %s fwd %s", version, name);
    expect_close(label, outside(out, channels, layout, poisoned), outside(out_ref, channels, layout, poisoned), rtol);
    std::snprintf(label, sizeof label, "depthwise %s d(taps) %s", version, name);
    if (poisoned < 0) expect_close(label, taps_grad, taps_grad_ref, acc_rtol);
  };
  const int32_t* offsets = layout.device_offsets();
  const int sequences = layout.sequences();
  for (const KernelChoice kernels : {KernelChoice::kTiled, KernelChoice::kV1}) {  // through the launchers' plans
    const DepthwisePlan plan = depthwise_forward_plan(kernels, batch, seq_len, channels, K);
    const WeightGradPlan wg = depthwise_weight_grad_plan(kernels, batch, seq_len, channels, K);
    Buffer<T> out(x.t.size());
    // the glue allocates the partial sums from the plan, uninitialised: every entry must be written (NaN shows if not)
    Buffer<A> partials(size_t(wg.chunks) * K * channels, A(NAN));
    auto run = [&](auto packed) {
      constexpr bool Packed = decltype(packed)::value;
      if (plan.tiled) {
        launch(plan.blocks, plan.threads, [&] {
          depthwise_conv_forward_tiled_kernel<T, 9, Vector, Packed>(x.t.data(), taps.t.data(), out.data(),
                                                                    plan.tasks, plan.tiles, plan.groups, seq_len,
                                                                    channels, offsets, sequences);
        });
      } else {
        WITH_KS(K, KS,
          launch(plan.blocks, plan.threads, [&] {
            depthwise_conv_forward_kernel<T, KS, Packed>(x.t.data(), taps.t.data(), out.data(), rows, seq_len,
                                                         channels, K, offsets, sequences);
          }))
      }
      if (wg.tiled) {
        launch(wg.blocks_x, wg.threads, [&] {
          depthwise_conv_weight_grad_tiled_kernel<T, 9, Vector, Packed>(grad.t.data(), x.t.data(), partials.data(),
                                                                        wg.tasks, wg.row_chunks, wg.groups, seq_len,
                                                                        channels, offsets, sequences);
        });
      } else {
        launch({unsigned(wg.blocks_x), unsigned(wg.blocks_y), 1}, wg.threads, [&] {
          depthwise_conv_weight_grad_kernel<T, Packed>(grad.t.data(), x.t.data(), partials.data(), rows, seq_len,
                                                       channels, K, wg.chunk_rows, offsets, sequences);
        });
      }
    };
    if (offsets) run(std::true_type{});
    else run(std::false_type{});
    const char* version = plan.tiled ? "v2" : kernels == KernelChoice::kV1 ? "v1" : "v1 (the tiled choice took it)";
    check(version, out, partials);
  }
}

// Offsets that break every rule (decreasing, negative, past the end, not starting at 0, not ending at T): results
// are meaningless, but under the sanitizers (the CI build) no kernel may touch memory outside its tensors.
template <typename T>
void bad_offsets_case() {
  const int seq_len = 40, heads = 2, head_size = 16, K = 9, channels = 40;
  running_case = "bad offsets";
  const std::vector<std::vector<int32_t>> bad = {
      {5, 100, 3, -7, 12}, {0, 41}, {-2147483647 - 1, 2147483647}, {40, 0}, {0, 20, 20, 61, 40}};
  std::mt19937 rng(21);
  Data<T> values(size_t(seq_len) * heads * head_size, rng), logits(size_t(seq_len) * heads * K, rng);
  Data<T> x(size_t(seq_len) * channels, rng), taps(size_t(K) * channels, rng);
  Buffer<T> out(values.t.size()), grad_values(values.t.size()), grad_logits(logits.t.size()), dw_out(x.t.size());
  Buffer<typename AccType<T>::type> weights(logits.t.size()), partials(size_t(K) * channels);
  const int width = heads * head_size, span_tasks = heads * ceil_div(seq_len, kSpanTile);
  for (const auto& o : bad) {
    const int n = static_cast<int>(o.size()) - 1;
    launch(ceil_div(span_tasks, span_tile_warps<T>()), span_tile_warps<T>() * 32, [&] {
      span_conv_forward_tiled_kernel<T, 9, true, true>(values.t.data(), logits.t.data(), out.data(), span_tasks,
                                                       ceil_div(seq_len, kSpanTile), seq_len, heads, head_size,
                                                       int64_t(seq_len) * width, width, int64_t(seq_len) * width,
                                                       width, o.data(), n);
    });
    launch(ceil_div(span_tasks, span_tile_warps<T>()), span_tile_warps<T>() * 32, [&] {
      span_conv_backward_tiled_kernel<T, 9, true, true>(values.t.data(), values.t.data(), logits.t.data(),
                                                        grad_values.data(), grad_logits.data(), span_tasks,
                                                        ceil_div(seq_len, kSpanTile), seq_len, heads, head_size,
                                                        int64_t(seq_len) * width, width, int64_t(seq_len) * width,
                                                        width, o.data(), n);
    });
    const unsigned span_blocks = ceil_div(seq_len * heads, kSpanWarpsPerBlock);
    launch(span_blocks, kSpanWarpsPerBlock * 32, [&] {
      span_conv_forward_kernel<T, 9, true>(values.t.data(), logits.t.data(), out.data(), 1, seq_len, heads, head_size,
                                           K, int64_t(seq_len) * width, width, int64_t(seq_len) * width, width,
                                           o.data(), n);
    });
    launch(span_blocks, kSpanWarpsPerBlock * 32, [&] {
      span_conv_backward_logits_kernel<T, 9, true>(values.t.data(), values.t.data(), logits.t.data(),
                                                   grad_logits.data(), weights.data(), 1, seq_len, heads, head_size,
                                                   K, int64_t(seq_len) * width, width, o.data(), n);
    });
    launch(span_blocks, kSpanWarpsPerBlock * 32, [&] {
      span_conv_backward_values_kernel<T, 9, true>(values.t.data(), weights.data(), grad_values.data(), 1, seq_len,
                                                   heads, head_size, K, o.data(), n);
    });
    const int tiles = ceil_div(seq_len, kDepthwiseTile), groups = ceil_div(channels, 32 * kDepthwiseVec);
    launch(ceil_div(tiles * groups, kDepthwiseWarps), kDepthwiseWarps * 32, [&] {
      depthwise_conv_forward_tiled_kernel<T, 9, false, true>(x.t.data(), taps.t.data(), dw_out.data(), tiles * groups,
                                                             tiles, groups, seq_len, channels, o.data(), n);
    });
    const int wg_groups = ceil_div(channels, 32 * kWeightGradVec);
    launch(ceil_div(wg_groups, kDepthwiseWarps), kDepthwiseWarps * 32, [&] {
      depthwise_conv_weight_grad_tiled_kernel<T, 9, false, true>(x.t.data(), x.t.data(), partials.data(), wg_groups, 1,
                                                                 wg_groups, seq_len, channels, o.data(), n);
    });
    launch(ceil_div(seq_len * channels, 256), 256, [&] {
      depthwise_conv_forward_kernel<T, 9, true>(x.t.data(), taps.t.data(), dw_out.data(), seq_len, seq_len, channels, K,
                                          o.data(), n);
    });
    launch({unsigned(ceil_div(channels, 256)), 1, 1}, 256, [&] {
      depthwise_conv_weight_grad_kernel<T, true>(x.t.data(), x.t.data(), partials.data(), seq_len, seq_len, channels, K, 64,
                                           o.data(), n);
    });
  }
  std::printf("%-60s %zu sets of offsets ran ok\n", "bad offsets: every packed conv kernel", bad.size());
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
  running_case = std::string("LayerNorm ") + name;
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
  // the seed by value (a CPU tensor's) to v1, by address (a GPU tensor's, read by the kernels) to v2
  const int64_t seed_on_device = static_cast<int64_t>(seed);
  const DropoutSeed by_value{seed, nullptr}, on_device{0, &seed_on_device};
  // each kernel choice through the launchers' plans (csrc/cuda/plan.h), which must pick these NV vectors per lane
  for (const KernelChoice kernels : {KernelChoice::kTiled, KernelChoice::kV1}) {
    Buffer<T> out(x.t.size()), gx(x.t.size()), gr(x.t.size());
    Buffer<A> mean(rows), rstd(rows);
    const NormPlan forward = norm_forward_plan(kernels, dtype_of<T>(), x.t.data(), residual.t.data(),
                                               weight.t.data(), bias.t.data(), out.data(), rows, channels);
    const NormPlan backward = norm_backward_plan(kernels, dtype_of<T>(), grad.t.data(), x.t.data(),
                                                 residual.t.data(), weight.t.data(), gx.data(), gr.data(), rows,
                                                 channels);
    const int expected = kernels == KernelChoice::kTiled ? NV : 0;
    if (forward.vectors != expected || backward.vectors != expected) {
      ++failures;
      std::printf("LayerNorm %s: the plans chose %d and %d vectors per lane, not %d\n", name, forward.vectors,
                  backward.vectors, expected);
      continue;
    }
    // the partial sums as the glue allocates them, from the plan: every entry must be written (NaN shows if not)
    Buffer<A> wp(size_t(backward.weight_rows) * channels, A(NAN)), bp(size_t(backward.bias_rows) * channels, A(NAN));
    if (forward.vectors > 0) {
      launch(forward.forward_blocks, kNormWarps * 32, [&] {
        dropout_add_layer_norm_forward_tiled_kernel<T, NV, Dropout>(
            x.t.data(), residual.t.data(), weight.t.data(), bias.t.data(), out.data(), mean.data(), rstd.data(), rows,
            channels, on_device, threshold, static_cast<A>(scale), static_cast<A>(eps));
      });
      launch(backward.backward_blocks, kNormWarps * 32, [&] {
        dropout_add_layer_norm_backward_tiled_kernel<T, NV, Dropout>(
            grad.t.data(), x.t.data(), residual.t.data(), weight.t.data(), mean.data(), rstd.data(), gx.data(),
            gr.data(), wp.data(), bp.data(), rows, channels, on_device, threshold, static_cast<A>(scale));
      });
    } else {  // v1: a block per row; d(bias) is the caller's sum of grad
      launch(forward.forward_blocks, kNormThreads, [&] {
        dropout_add_layer_norm_forward_kernel<T>(x.t.data(), residual.t.data(), weight.t.data(), bias.t.data(),
                                                 out.data(), mean.data(), rstd.data(), channels, by_value, threshold,
                                                 static_cast<A>(scale), static_cast<A>(eps));
      });
      launch(backward.backward_blocks, kNormThreads, [&] {
        dropout_add_layer_norm_backward_kernel<T>(grad.t.data(), x.t.data(), residual.t.data(), weight.t.data(),
                                                  mean.data(), rstd.data(), gx.data(), gr.data(), wp.data(), channels,
                                                  by_value, threshold, static_cast<A>(scale));
      });
      bp.assign(size_t(rows) * channels, A(0));
      for (size_t i = 0; i < bp.size(); ++i) bp[i] = to_d(grad.t[i]);
    }
    std::vector<double> dw(channels, 0.0), db(channels, 0.0);
    for (size_t k = 0; k < wp.size() / channels; ++k)
      for (int c = 0; c < channels; ++c) dw[c] += wp[k * channels + c];
    for (size_t k = 0; k < bp.size() / channels; ++k)
      for (int c = 0; c < channels; ++c) db[c] += bp[k * channels + c];
    const char* version = kernels == KernelChoice::kTiled ? "v2" : "v1";
    char label[160];
    std::snprintf(label, sizeof label, "LayerNorm %s fwd %s", version, name);
    expect_close(label, out, out_ref, rtol);
    std::snprintf(label, sizeof label, "LayerNorm %s d(x) %s", version, name);
    expect_close(label, gx, gx_ref, rtol);
    std::snprintf(label, sizeof label, "LayerNorm %s d(residual) %s", version, name);
    expect_close(label, gr, gr_ref, rtol);
    std::snprintf(label, sizeof label, "LayerNorm %s d(weight) %s", version, name);
    expect_close(label, dw, dw_ref, acc_rtol);
    std::snprintf(label, sizeof label, "LayerNorm %s d(bias) %s", version, name);
    expect_close(label, db, db_ref, acc_rtol);
  }
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

// Planted (--planted-divergence): divergent code whose lanes reach a shuffle, then a __syncwarp, from two lines each,
// undefined on a GPU; both meetings must be reported (DIVERGENT) and fail the run.
__global__ void planted_divergent_kernel(float* out) {
  const int lane = threadIdx.x & 31;
  float v = static_cast<float>(lane);
  if (lane < 16) v += __shfl_xor_sync(0xffffffffu, v, 16);
  else v -= __shfl_xor_sync(0xffffffffu, v, 16);
  if (lane % 2 == 0) __syncwarp();
  else __syncwarp();
  out[threadIdx.x] = v;
}
void planted_divergence_case() {
  running_case = "planted divergent kernel";
  Buffer<float> out(64);
  launch(1, 64, [&] { planted_divergent_kernel(out.data()); });
  std::printf("%-60s %d divergent meeting(s) reported\n", "planted divergent kernel", divergent_meetings.load());
}

int main(int argc, char** argv) {
  bool one_case = false, planted_divergence = false;
  std::string dropped;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--one-case") one_case = true;
    else if (arg == "--planted-divergence") planted_divergence = true;
    else if (arg == "--drop-syncwarp" && i + 1 < argc) dropped = std::string(argv[++i]) + "(";
    else {
      std::printf("usage: %s [--one-case] [--drop-syncwarp KERNEL] [--planted-divergence]\n", argv[0]);
      return 2;
    }
  }
  if (!dropped.empty()) dropped_syncwarp = dropped.c_str();
  if (planted_divergence || one_case) {
    if (planted_divergence) planted_divergence_case();
    if (one_case) span_conv_case<float, true>("fp32 D=64 L=70 vector", Layout::rows(2, 70), 3, 64, 9, 0, 2e-6);
    failures += divergent_meetings.load();
    std::printf("%d failure(s)\n", failures);
    return failures != 0;
  }
  dropout_words_case();
  // fp32: errors of fp32 accumulation (~1e-6 relative); bf16 and fp16: the output's rounding (2^-8, 2^-11) on top.
  // Packed rows (cu_seqlens) hold an empty sequence, one token, fewer than K and more than K, across tiles.
  span_conv_case<float, true>("fp32 D=64 L=70 vector", Layout::rows(2, 70), 3, 64, 9, 0, 2e-6);
  span_conv_case<float, true>("fp32 D=40 L=33 vector, out rows padded by 8", Layout::rows(2, 33), 2, 40, 9, 8, 2e-6);
  span_conv_case<float, false>("fp32 D=38 L=70 scalar, out rows padded by 6", Layout::rows(1, 70), 2, 38, 9, 6, 2e-6);
  span_conv_case<__nv_bfloat16, true>("bf16 D=64 L=130 vector", Layout::rows(1, 130), 2, 64, 9, 0, 8e-3);
  span_conv_case<__half, true>("fp16 D=32 L=40 vector", Layout::rows(2, 40), 2, 32, 9, 0, 1.5e-3);
  span_conv_case<double, true>("fp64 D=64 L=5 vector", Layout::rows(1, 5), 2, 64, 9, 0, 1e-13);
  span_conv_case<float, true>("fp32 D=64 packed 5,1,0,9,3,70,0,17 vector", Layout::packed({5, 1, 0, 9, 3, 70, 0, 17}),
                              2, 64, 9, 0, 2e-6);
  span_conv_case<float, false>("fp32 D=38 packed 2,0,1,40,8 scalar, out padded by 6", Layout::packed({2, 0, 1, 40, 8}),
                               2, 38, 9, 6, 2e-6);
  span_conv_case<__nv_bfloat16, true>("bf16 D=64 packed 0,70,1,4,33 vector", Layout::packed({0, 70, 1, 4, 33}), 1, 64,
                                      9, 0, 8e-3);
  span_conv_case<__half, false>("fp16 D=30 packed 6,1,12 scalar", Layout::packed({6, 1, 12}), 2, 30, 9, 0, 1.5e-3);
  span_conv_case<double, true>("fp64 D=32 packed 3,0,12,1 vector", Layout::packed({3, 0, 12, 1}), 2, 32, 9, 0, 1e-13);
  span_conv_case<float, true>("fp32 D=32 packed 12,5,30, the 5 NaN", Layout::packed({12, 5, 30}), 2, 32, 9, 0, 2e-6,
                              1);
  span_conv_case<float, true>("fp32 D=16 K=5 packed 4,0,1,20 (v1 only)", Layout::packed({4, 0, 1, 20}), 2, 16, 5, 0,
                              2e-6);
  span_conv_case<float, true>("fp32 D=48 K=15 L=21 (v1 only)", Layout::rows(2, 21), 1, 48, 15, 0, 2e-6);
  depthwise_case<float, true>("fp32 C=200 L=70 vector", Layout::rows(2, 70), 200, 9, 2e-6);
  depthwise_case<float, false>("fp32 C=198 L=300 scalar", Layout::rows(1, 300), 198, 9, 2e-6);
  depthwise_case<__nv_bfloat16, true>("bf16 C=256 L=40 vector", Layout::rows(2, 40), 256, 9, 8e-3);
  depthwise_case<__half, true>("fp16 C=128 L=40 vector", Layout::rows(1, 40), 128, 9, 1.5e-3);
  depthwise_case<float, true>("fp32 C=200 packed 5,1,0,9,3,150,0,17 vector",
                              Layout::packed({5, 1, 0, 9, 3, 150, 0, 17}), 200, 9, 2e-6);
  depthwise_case<float, false>("fp32 C=198 packed 1,0,7,40 scalar", Layout::packed({1, 0, 7, 40}), 198, 9, 2e-6);
  depthwise_case<__nv_bfloat16, true>("bf16 C=256 packed 0,70,1,4,33 vector", Layout::packed({0, 70, 1, 4, 33}), 256,
                                      9, 8e-3);
  depthwise_case<__half, false>("fp16 C=66 packed 6,1,12 scalar", Layout::packed({6, 1, 12}), 66, 9, 1.5e-3);
  depthwise_case<double, true>("fp64 C=64 packed 3,0,12,1,40 vector", Layout::packed({3, 0, 12, 1, 40}), 64, 9, 1e-13);
  depthwise_case<float, true>("fp32 C=64 packed 12,5,30, the 5 NaN", Layout::packed({12, 5, 30}), 64, 9, 2e-6, 1);
  depthwise_case<float, true>("fp32 C=64 K=5 packed 4,0,1,20 (v1 only)", Layout::packed({4, 0, 1, 20}), 64, 5, 2e-6);
  depthwise_case<float, true>("fp32 C=32 K=15 L=21 (v1 only)", Layout::rows(2, 21), 32, 15, 2e-6);
  bad_offsets_case<float>();
  layer_norm_case<float, 2, true>("fp32 C=200 rows=37 p=0.3", 37, 200, 0.3, 2e-6);
  layer_norm_case<float, 1, false>("fp32 C=128 rows=40 p=0", 40, 128, 0.0, 2e-6);
  layer_norm_case<__nv_bfloat16, 3, true>("bf16 C=768 rows=9 p=0.1", 9, 768, 0.1, 8e-3);
  layer_norm_case<double, 4, true>("fp64 C=256 rows=33 p=0.5", 33, 256, 0.5, 1e-12);
  // fp32 up to C = 1024 (ConvBERT-base's LayerNorm under autocast): 6 vectors per lane, and 7 rounded up to 8
  layer_norm_case<float, 6, true>("fp32 C=768 rows=9 p=0.1", 9, 768, 0.1, 2e-6);
  layer_norm_case<float, 8, true>("fp32 C=900 rows=5 p=0.2 (8 vectors, 1 masked)", 5, 900, 0.2, 2e-6);
  failures += divergent_meetings.load();
  std::printf("%d failure(s)\n", failures);
  return failures != 0;
}
