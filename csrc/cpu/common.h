// What the CPU kernels of every op share. Rows (b, t) are split over threads with at::parallel_for; the
// inner loops run over contiguous channels with fp32 (fp64 for double) accumulators, on tiles of vectors (Tile) or
// in loops the compiler vectorises. No reduction depends on the thread count, so every result is bitwise repeatable.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
// fixed-size tiles are vectorised without reassociating any sum.
constexpr int64_t kTile = 16;

// A tile: kTile channels of the accumulation type, as kTile / kLanes native vectors of kBytes bytes (GNU vectors,
// GCC and clang): one zmm per fp32 tile at AVX-512 (kBytes 64), two ymm at AVX2 (32), four xmm at the baseline (16).
// The tile loops are written on it because GCC's auto-vectoriser gives up on bf16's conversions inside the kernels'
// loop nests (fp32 and fp64 it vectorised; bf16 ran one element at a time); vectors of the level's own width, because
// wider ones live in memory. Lane i of the tile is channel i at every level, so the per-channel sums are the same.
template <typename acc_t, int kBytes>
struct VectorsOf {  // (the vector types outside Tile: GCC takes a dependent one in __builtin_convertvector only so)
  typedef acc_t Vector __attribute__((vector_size(kBytes)));
  typedef uint32_t Words __attribute__((vector_size(kBytes)));          // the bits of an fp32 vector
  typedef uint16_t Bf16Bits __attribute__((vector_size(kBytes / 2)));   // as many bf16 values
};

template <typename acc_t, int kBytes>
struct Tile {
  using Vector = typename VectorsOf<acc_t, kBytes>::Vector;
  using Words = typename VectorsOf<acc_t, kBytes>::Words;
  using Bf16Bits = typename VectorsOf<acc_t, kBytes>::Bf16Bits;
  static constexpr int64_t kLanes = kBytes / sizeof(acc_t), kVectors = kTile / kLanes;
  static_assert(kVectors * kLanes == kTile, "a tile is whole vectors");
  Vector v[kVectors] = {};

  // p[0 .. kTile) widened to acc_t, exactly (bf16: its bits are the top half of an fp32).
  template <typename scalar_t>
  void load(const scalar_t* p) {
    for (int64_t q = 0; q < kVectors; ++q) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::memcpy(&v[q], p + q * kLanes, kBytes);  // one vector at a time: a whole-array copy goes through memory
      } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        Bf16Bits bits;
        std::memcpy(&bits, p + q * kLanes, kBytes / 2);
        v[q] = reinterpret_cast<Vector>(__builtin_convertvector(bits, Words) << 16);
      } else {
        for (int64_t i = 0; i < kLanes; ++i) v[q][i] = static_cast<acc_t>(p[q * kLanes + i]);
      }
    }
  }

  // p[0 .. kTile) = the lanes rounded to scalar_t, as c10's conversions round.
  template <typename scalar_t>
  void store(scalar_t* p) const {
    for (int64_t q = 0; q < kVectors; ++q) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::memcpy(p + q * kLanes, &v[q], kBytes);
      } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        Words rounded;
        round_to_bf16(q, rounded);
        const Bf16Bits bits = __builtin_convertvector(rounded >> 16, Bf16Bits);
        std::memcpy(p + q * kLanes, &bits, kBytes / 2);
      } else {
        for (int64_t i = 0; i < kLanes; ++i) p[q * kLanes + i] = static_cast<scalar_t>(v[q][i]);
      }
    }
  }

  // bits = vector q rounded to bf16, in the top half of each word: to nearest even, NaN to c10's quiet NaN, as
  // c10::BFloat16's conversion rounds one value. (An out-parameter: GCC warns about the ABI of returning a vector
  // wider than the baseline's registers, although every helper here is inlined.)
  void round_to_bf16(int64_t q, Words& bits) const {
    const Words u = reinterpret_cast<Words>(v[q]);
    const Words nan = reinterpret_cast<Words>(v[q] != v[q]);  // all ones where NaN
    bits = ((u + 0x7FFFu + ((u >> 16) & 1u)) & ~nan) | (0x7FC00000u & nan);
  }

  void add(acc_t weight, const Tile& x) {  // += weight * x
    for (int64_t q = 0; q < kVectors; ++q) v[q] += weight * x.v[q];
  }
  void add(const Tile& a, const Tile& b) {  // += a * b, lane by lane
    for (int64_t q = 0; q < kVectors; ++q) v[q] += a.v[q] * b.v[q];
  }
  void add(const Tile& x) {
    for (int64_t q = 0; q < kVectors; ++q) v[q] += x.v[q];
  }

  // The sum of the lanes in a fixed order, the same at every level: halves added lane by lane (a tree, not a chain).
  acc_t sum() const {
    acc_t s[kTile];
    for (int64_t q = 0; q < kVectors; ++q) std::memcpy(s + q * kLanes, &v[q], kBytes);
    for (int64_t width = kTile / 2; width > 0; width /= 2) {
      for (int64_t i = 0; i < width; ++i) s[i] += s[i + width];
    }
    return s[0];
  }
};

// 2 * kTile bf16 values as two fp32 tiles without a shuffle: a 32-bit word holds an even channel in its low half and
// the next odd one in its high half, so shifting the word up gives the even channel's fp32 value and masking its low
// half the odd one's (exactly, as Tile::load). Two instructions per 32 values, where GCC's widening conversion takes
// six per 16. Lane i of `even` is channel 2i, of `odd` channel 2i + 1.
template <int kBytes>
inline void load_pairs(const c10::BFloat16* p, Tile<float, kBytes>& even, Tile<float, kBytes>& odd) {
  using T = Tile<float, kBytes>;
  for (int64_t q = 0; q < T::kVectors; ++q) {
    typename T::Words words;
    std::memcpy(&words, p + 2 * q * T::kLanes, kBytes);
    even.v[q] = reinterpret_cast<typename T::Vector>(words << 16);
    odd.v[q] = reinterpret_cast<typename T::Vector>(words & 0xFFFF0000u);
  }
}

// p[0 .. 2 * kTile) = the even and odd channels rounded to bf16 (as Tile::store rounds), interleaved back.
template <int kBytes>
inline void store_pairs(const Tile<float, kBytes>& even, const Tile<float, kBytes>& odd, c10::BFloat16* p) {
  using T = Tile<float, kBytes>;
  for (int64_t q = 0; q < T::kVectors; ++q) {
    typename T::Words even_bits, odd_bits;
    even.round_to_bf16(q, even_bits);
    odd.round_to_bf16(q, odd_bits);
    const typename T::Words words = (even_bits >> 16) | (odd_bits & 0xFFFF0000u);
    std::memcpy(p + 2 * q * T::kLanes, &words, kBytes);
  }
}

// The instruction sets the kernels below are compiled for, best last. Each kernel processes a range of rows, so
// that at::parallel_for stays outside it and its fp32, fp64 and bf16 instantiations can be compiled once per x86
// level and picked at run time (GCC's target attribute; `flatten` inlines the helpers into every copy). bf16 lanes
// are widened to fp32 exactly and rounded back as c10 rounds (Tile): the same bits at every level. fp16 runs the
// baseline copy at every level (c10::Half's conversion branches: no level vectorises it).
enum class CpuIsa : int {
  kBaseline = 0,  // x86-64 (SSE2), or any other CPU: the portable template
  kAvx2 = 1,      // x86-64-v3: AVX2, FMA, F16C
  kAvx512 = 2,    // x86-64-v4: AVX-512 F, BW, CD, DQ, VL
};
// The level the kernels run at (cpu_isa.cpp): the best this CPU has, capped by the environment variable
// CONVBERT_FAST_CPU_ISA (avx512, avx2 or baseline; read at the first call) or by set_cpu_isa (tests, benchmarks).
CpuIsa cpu_isa();

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CONVBERT_FAST_X86_LEVELS 1
#define CONVBERT_FAST_TARGET(ARCH) __attribute__((target(ARCH), flatten))
#else
#define CONVBERT_FAST_X86_LEVELS 0
#endif

#if CONVBERT_FAST_X86_LEVELS
// KERNEL##_best(args, begin, end): KERNEL<scalar_t, kBytes> compiled for the level cpu_isa() names, kBytes its vector
// width (Tile).
#define CONVBERT_FAST_CLONED(KERNEL, ARGS)                                                                        \
  template <typename scalar_t>                                                                                    \
  CONVBERT_FAST_TARGET("arch=x86-64-v4") void KERNEL##_avx512(const ARGS<scalar_t>& a, int64_t b, int64_t e) {    \
    KERNEL<scalar_t, 64>(a, b, e);                                                                                \
  }                                                                                                               \
  template <typename scalar_t>                                                                                    \
  CONVBERT_FAST_TARGET("arch=x86-64-v3") void KERNEL##_avx2(const ARGS<scalar_t>& a, int64_t b, int64_t e) {      \
    KERNEL<scalar_t, 32>(a, b, e);                                                                                \
  }                                                                                                               \
  template <typename scalar_t>                                                                                    \
  __attribute__((flatten)) void KERNEL##_baseline(const ARGS<scalar_t>& a, int64_t b, int64_t e) {                \
    KERNEL<scalar_t, 16>(a, b, e);                                                                                \
  }                                                                                                               \
  template <typename scalar_t>                                                                                    \
  void KERNEL##_best(const ARGS<scalar_t>& a, int64_t b, int64_t e) {                                             \
    if constexpr (std::is_same_v<scalar_t, at::Half>) {                                                           \
      KERNEL##_baseline(a, b, e);                                                                                 \
    } else {                                                                                                      \
      switch (cpu_isa()) {                                                                                        \
        case CpuIsa::kAvx512: return KERNEL##_avx512(a, b, e);                                                    \
        case CpuIsa::kAvx2: return KERNEL##_avx2(a, b, e);                                                        \
        default: return KERNEL##_baseline(a, b, e);                                                               \
      }                                                                                                           \
    }                                                                                                             \
  }
#else
#define CONVBERT_FAST_CLONED(KERNEL, ARGS)                                          \
  template <typename scalar_t>                                                      \
  void KERNEL##_best(const ARGS<scalar_t>& a, int64_t b, int64_t e) {               \
    KERNEL<scalar_t, 16>(a, b, e);                                                  \
  }
#endif

#define DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace convbert_fast
