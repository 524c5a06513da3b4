// Conversions, warp reductions and vector loads shared by the kernels. fp16/bf16 accumulate in fp32, fp64 in fp64.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

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

// Words = N * sizeof(T) / 4 32-bit words from/to 4 * Words-byte-aligned memory, in 16-byte pieces.
template <int Words>
__device__ __forceinline__ void load_words(const void* p, uint32_t (&w)[Words]) {
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

template <int Words>
__device__ __forceinline__ void store_words(void* p, const uint32_t (&w)[Words]) {
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

template <typename T, int N, bool Vector>
__device__ __forceinline__ void store_vec(T* p, bool on, int count, const typename AccType<T>::type (&x)[N]) {
  if constexpr (Vector) {
    if (on) {
      uint32_t w[N * sizeof(T) / 4];
      acc_to_words<T, N>(x, w);
      store_words(p, w);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (on && i < count) p[i] = from_acc<T>(x[i]);
    }
  }
}

// Whether vectors of n elements of element_size bytes can be used: every pointer aligned to a vector, every
// stride (in elements, the head size included) a multiple of n.
inline bool vectors_aligned(int64_t n, int64_t element_size, std::initializer_list<const void*> pointers,
                            std::initializer_list<int64_t> strides) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % (n * element_size) != 0) return false;
  }
  for (int64_t s : strides) {
    if (s % n != 0) return false;
  }
  return true;
}

}  // namespace convbert_fast
