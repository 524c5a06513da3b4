// Turning the launchers' runtime dtype and kernel size into template arguments.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

// K = 9 (every released checkpoint) gets its own unrolled instantiation; any other odd K up to
// kMaxCudaKernelSize the generic one.
#define CONVBERT_FAST_WITH_KERNEL_SIZE(K, KS_NAME, ...) \
  if ((K) == 9) {                                      \
    constexpr int KS_NAME = 9;                         \
    __VA_ARGS__;                                       \
  } else {                                             \
    constexpr int KS_NAME = 0;                         \
    __VA_ARGS__;                                       \
  }

// Packed sequences (offsets, launchers.h) get their own instantiation, so that the unpacked code stays as it was.
#define CONVBERT_FAST_WITH_PACKED(OFFSETS, PACKED_NAME, ...) \
  if ((OFFSETS) != nullptr) {                               \
    constexpr bool PACKED_NAME = true;                      \
    __VA_ARGS__;                                            \
  } else {                                                  \
    constexpr bool PACKED_NAME = false;                     \
    __VA_ARGS__;                                            \
  }

#define CONVBERT_FAST_DISPATCH(DTYPE, FN, ...)                   \
  switch (DTYPE) {                                              \
    case DType::Float32: FN<float>(__VA_ARGS__); break;         \
    case DType::Float64: FN<double>(__VA_ARGS__); break;        \
    case DType::Float16: FN<__half>(__VA_ARGS__); break;        \
    case DType::BFloat16: FN<__nv_bfloat16>(__VA_ARGS__); break; \
  }
