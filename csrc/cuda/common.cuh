// Conversions, warp reductions and vector loads shared by the kernels. fp16/bf16 accumulate in fp32, fp64 in fp64.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "plan.h"

namespace convbert_fast {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccType<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Butterfly sum: every lane ends with the same bits (each step adds the same pair in either order).
template <typename A>
__device__ __forceinline__ A warp_sum(A value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename A>
__device__ __forceinline__ A warp_max(A value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// Loads and stores of N adjacent channels (N = 2 or 4) for the tiled (v2) kernels, converted to and from the
// accumulation type. With Vector, one load of N elements (8 bytes for 4 bf16; two 16-byte loads for 4 doubles):
// the launcher checks the alignment (vectors_aligned). Without it, N scalar accesses, each channel past `count`
// reading 0 and not written. A lane that is off reads zeros and writes nothing.

// Words = N * sizeof(T) / 4 32-bit words from/to 4 * Words-byte-aligned memory, in 16-byte pieces. A GPU faults on
// a misaligned vector access and x86 does not: the emulation defines CONVBERT_FAST_VECTOR_ALIGNED to trap there.
#ifndef CONVBERT_FAST_VECTOR_ALIGNED
#define CONVBERT_FAST_VECTOR_ALIGNED(pointer, bytes)
#endif
template <int Words>
__device__ __forceinline__ void load_words(const void* p, uint32_t (&w)[Words]) {
  CONVBERT_FAST_VECTOR_ALIGNED(p, 4 * Words);
  if constexpr (Words == 1) {
    w[0] = *static_cast<const uint32_t*>(p);
  } else if constexpr (Words == 2) {
    const uint2 v = *static_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else {
    static_assert(Words % 4 == 0, "whole 16-byte pieces");
#pragma unroll
    for (int i = 0; i < Words / 4; ++i) {
      const uint4 v = static_cast<const uint4*>(p)[i];
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
  }
}

// AsWritten: PTX vector stores as written. A uint2 or uint4 assignment came out of NVVM (in the PTX, before ptxas)
// as 2 or 4 scalar st.global in the span conv's kernels, and whole in the depthwise and LayerNorm ones (issue 24,
// item 4); inline PTX keeps it whole, at the cost of an address register per store (no [reg + offset] form), so
// only the span conv takes it. No "memory" clobber: no kernel reads back what it stores, and loads stay free to
// move past the store.
template <int Words, bool AsWritten = false>
__device__ __forceinline__ void store_words(void* p, const uint32_t (&w)[Words]) {
  CONVBERT_FAST_VECTOR_ALIGNED(p, 4 * Words);
#if defined(__CUDA_ARCH__)
  if constexpr (AsWritten && Words == 2) {
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]));
    return;
  } else if constexpr (AsWritten && Words % 4 == 0) {
#pragma unroll
    for (int i = 0; i < Words / 4; ++i) {
      asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(static_cast<uint4*>(p) + i), "r"(w[4 * i]),
                   "r"(w[4 * i + 1]), "r"(w[4 * i + 2]), "r"(w[4 * i + 3]));
    }
    return;
  }
#endif
  if constexpr (Words == 1) {
    *static_cast<uint32_t*>(p) = w[0];
  } else if constexpr (Words == 2) {
    *static_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  } else {
    static_assert(Words % 4 == 0, "whole 16-byte pieces");
#pragma unroll
    for (int i = 0; i < Words / 4; ++i) {
      static_cast<uint4*>(p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    }
  }
}

// Element i of the words, widened; and back, rounded to nearest even.
template <typename T, int N>
__device__ __forceinline__ void words_to_acc(const uint32_t (&w)[N * sizeof(T) / 4], typename AccType<T>::type (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16 is an fp32's top half: one integer op, exact
      x[i] = __uint_as_float(i % 2 == 0 ? w[i / 2] << 16 : w[i / 2] & 0xffff0000u);
    } else if constexpr (std::is_same_v<T, __half>) {
      x[i] = __half2float(__ushort_as_half(static_cast<unsigned short>(i % 2 == 0 ? w[i / 2] : w[i / 2] >> 16)));
    } else if constexpr (std::is_same_v<T, float>) {
      x[i] = __uint_as_float(w[i]);
    } else {
      x[i] = __hiloint2double(static_cast<int>(w[2 * i + 1]), static_cast<int>(w[2 * i]));
    }
  }
}

template <typename T, int N>
__device__ __forceinline__ void acc_to_words(const typename AccType<T>::type (&x)[N], uint32_t (&w)[N * sizeof(T) / 4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      if (i % 2 == 1) {
        const __nv_bfloat162 pair = __floats2bfloat162_rn(x[i - 1], x[i]);
        w[i / 2] = *reinterpret_cast<const uint32_t*>(&pair);
      }
    } else if constexpr (std::is_same_v<T, __half>) {
      if (i % 2 == 1) {
        const __half2 pair = __floats2half2_rn(x[i - 1], x[i]);
        w[i / 2] = *reinterpret_cast<const uint32_t*>(&pair);
      }
    } else if constexpr (std::is_same_v<T, float>) {
      w[i] = __float_as_uint(x[i]);
    } else {
      w[2 * i] = static_cast<uint32_t>(__double2loint(x[i]));
      w[2 * i + 1] = static_cast<uint32_t>(__double2hiint(x[i]));
    }
  }
}

// Channels 0 .. N-1 from p (`count` of them in range when !Vector).
template <typename T, int N, bool Vector>
__device__ __forceinline__ void load_vec(const T* p, bool on, int count, typename AccType<T>::type (&x)[N]) {
  using A = typename AccType<T>::type;
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = A(0);
  if constexpr (Vector) {
    if (on) {
      uint32_t w[N * sizeof(T) / 4];
      load_words(p, w);
      words_to_acc<T, N>(w, x);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (on && i < count) x[i] = to_acc(p[i]);
    }
  }
}

template <typename T, int N, bool Vector, bool AsWritten = false>
__device__ __forceinline__ void store_vec(T* p, bool on, int count, const typename AccType<T>::type (&x)[N]) {
  if constexpr (Vector) {
    if (on) {
      uint32_t w[N * sizeof(T) / 4];
      acc_to_words<T, N>(x, w);
      store_words<N * sizeof(T) / 4, AsWritten>(p, w);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (on && i < count) p[i] = from_acc<T>(x[i]);
    }
  }
}

// Packed sequences (cu_seqlens, launchers.h): offsets[0..count] bound `count` sequences along one packed row of
// `total` rows. The sequence [lo, hi) holding `row` (0 <= row < total), by binary search; the bounds are clamped to
// [0, total) and to contain the row, so that whatever the offsets hold (the glue does not read CUDA offsets) only
// offsets[0..count] are read and every row a kernel reaches from them lies inside the input.
struct SequenceBounds {
  int64_t lo, hi;
};
__device__ __forceinline__ SequenceBounds sequence_of(const int32_t* __restrict__ offsets, int count, int64_t row,
                                                      int64_t total) {
  int a = 0, b = count;  // offsets[a] <= row < offsets[b] for well-formed offsets; empty sequences are passed over
  while (b - a > 1) {
    const int m = (a + b) >> 1;
    if (offsets[m] <= row) a = m;
    else b = m;
  }
  const int64_t lo = offsets[a], hi = offsets[b];
  return {lo < 0 ? 0 : lo > row ? row : lo, hi > total ? total : hi <= row ? row + 1 : hi};
}

// Where `row` of [B, L] rows seen as B * L sits in its sequence, and that sequence's length: unpacked, every batch
// row is one sequence of seq_len; packed (B = 1), the sequence holding it (as the CPU's Sequences::locate).
struct RowPosition {
  int64_t t, length;
};
template <bool Packed>
__device__ __forceinline__ RowPosition locate_row(const int32_t* __restrict__ offsets, int count, int64_t row,
                                                  int64_t seq_len) {
  if constexpr (Packed) {
    const SequenceBounds s = sequence_of(offsets, count, row, seq_len);
    return {row - s.lo, s.hi - s.lo};
  } else {
    return {row % seq_len, seq_len};
  }
}

// The taps of `row` whose rows row + j - K/2 lie inside its own sequence, as K - 1 bits: the centre tap (the row
// itself, always inside) left out and the others in summation order (tap_order), so that a token's predicates come
// from one R2P and a LOP3 in SASS. tap_inside() reads them back by tap.
template <int K>
__device__ __forceinline__ uint32_t taps_inside(const int32_t* __restrict__ offsets, int count, int row, int total) {
  static_assert(K % 2 == 1 && K < 32, "an odd K, one bit per tap");
  const SequenceBounds s = sequence_of(offsets, count, row, total);
  const int half = K / 2, position = static_cast<int>(row - s.lo), after = static_cast<int>(s.hi - 1 - row);
  const int below = position < half ? position : half, above = after < half ? after : half;  // taps inside each side
  // below taps before the centre (the last `below` of bits 0 .. half - 1), `above` after it (bits half ..)
  return (((1u << below) - 1u) << (half - below)) | (((1u << above) - 1u) << half);
}
template <int K>
__device__ __forceinline__ bool tap_inside(uint32_t bits, int j) {
  return j == K / 2 || (bits >> (j < K / 2 ? j : j - 1) & 1u);
}

// The bits for the row that taps j of its neighbours read (as taps_inside): tap j of row r + half - j reads r from
// inside its sequence exactly when tap K - 1 - j of r, which reads r + half - j, is inside r's. A mirror of the bits.
template <int K>
__device__ __forceinline__ uint32_t taps_reversed(uint32_t bits) {
  return __brev(bits) >> (32 - (K - 1));
}

// The order in which a token's K taps are summed: 0 .. K - 1; packed, the centre tap first, which is always inside the
// token's own sequence: it starts the sum, so the taps after it need a predicate each but no zeroed accumulator.
template <int K, bool Packed>
__device__ __forceinline__ constexpr int tap_order(int n) {
  return !Packed ? n : n == 0 ? K / 2 : n <= K / 2 ? n - 1 : n;
}

// A tap mask kept in a shared-memory row of accumulation-type values (the padding after a token's K weights).
__device__ __forceinline__ float mask_as_acc(uint32_t bits, float) { return __uint_as_float(bits); }
__device__ __forceinline__ double mask_as_acc(uint32_t bits, double) { return __longlong_as_double(bits); }
__device__ __forceinline__ uint32_t acc_as_mask(float value) { return __float_as_uint(value); }
__device__ __forceinline__ uint32_t acc_as_mask(double value) {
  return static_cast<uint32_t>(__double_as_longlong(value));
}

}  // namespace convbert_fast
