// What the CPU kernels of every op share. Rows (b, t) are split over threads with at::parallel_for; the
// inner loops run over contiguous channels with fp32 (fp64 for double) accumulators, written so that the
// compiler vectorises them. No reduction depends on the thread count, so every result is bitwise repeatable.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace convbert_fast {

// Where a row of a [B, L, ...] tensor seen as B * L rows sits in its sequence: without offsets every batch row is
// one sequence of L; with them (sequence_offsets, composite.h: B = 1, checked) the packed sequences they bound.
struct Sequences {
  const int32_t* offsets;  // [count + 1], or nullptr
  int64_t count, seq_len;

  Sequences(const at::Tensor& offsets_or_undefined, int64_t seq_len)
      : offsets(offsets_or_undefined.defined() ? offsets_or_undefined.const_data_ptr<int32_t>() : nullptr),
        count(offsets_or_undefined.defined() ? offsets_or_undefined.size(0) - 1 : 0),
        seq_len(seq_len) {}

  struct Position {
    int64_t t, length;  // the row's position inside its sequence, and that sequence's length
  };
  Position locate(int64_t row) const {
    if (offsets == nullptr) return {row % seq_len, seq_len};
    // the last offset <= row starts the row's sequence (empty sequences share it with the next one)
    const int64_t s = std::upper_bound(offsets, offsets + count + 1, row) - offsets - 1;
    return {row - offsets[s], offsets[s + 1] - offsets[s]};
  }
};

// Rows per task: enough work per task to amortise scheduling.
inline int64_t grain_for(int64_t work_per_row) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row)); }

// The inner loops work on tiles of kTile channels whose accumulators stay in registers across the taps;
// fixed-size tiles let the compiler vectorise them without reassociating any sum.
constexpr int64_t kTile = 16;

// The kernels below each process a range of rows, so that at::parallel_for stays outside them and the
// fp32/fp64 instantiations can be compiled once per x86 level (AVX-512, AVX2+FMA, baseline) and picked at
// load time (GCC function multi-versioning; `flatten` inlines the helpers into every clone).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CONVBERT_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define CONVBERT_FAST_CPU_CLONES
#endif

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

#define DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace convbert_fast
