// Dropout's keep/drop decision as a pure function of (seed, element index), the same on the CPU and on CUDA:
// the backward pass regenerates the mask instead of storing it. The bits are splitmix64's output for the
// index (a bijective 64-bit mixer: consecutive indices give independent-looking values).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define CONVBERT_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CONVBERT_FAST_HOST_DEVICE inline
#endif

namespace convbert_fast {

// Elements whose 24 random bits are below the threshold are dropped: P(drop) = threshold / 2^24.
constexpr uint32_t kDropoutBits = 24;

inline uint32_t dropout_threshold(double p) {
  const double scaled = p * static_cast<double>(1u << kDropoutBits);
  return scaled >= static_cast<double>(1u << kDropoutBits) ? (1u << kDropoutBits) : static_cast<uint32_t>(scaled + 0.5);
}

// What a kept element is multiplied by: 1 / (1 - p), in the accumulation type A (p = 1 keeps none: 0).
template <typename A>
inline A dropout_scale(double p) {
  return p < 1.0 ? static_cast<A>(1.0 / (1.0 - p)) : A(0);
}

// The mixer's input for index i is seed + (i + 1) * kDropoutStep: consecutive indices are kDropoutStep apart.
constexpr uint64_t kDropoutStep = 0x9E3779B97F4A7C15ull;

// splitmix64's finaliser on z = (hi:lo) in 32-bit words, keeping only what decides: (z >> 40) after the last
// `z ^= z >> 31` is the top 24 bits of z before it (that shift reaches no bit above 32), and those need only the
// high word of the last product. ~18 32-bit operations where the 64-bit code compiles to ~30 on a GPU; the same
// decisions (tests/emulation/tiled_kernels.cpp compares them).
CONVBERT_FAST_HOST_DEVICE bool dropout_keeps_words(uint32_t lo, uint32_t hi, uint32_t threshold) {
  // z ^= z >> 30; z *= 0xBF58476D1CE4E5B9
  lo ^= (lo >> 30) | (hi << 2), hi ^= hi >> 30;
  const uint64_t low_product = static_cast<uint64_t>(lo) * 0x1CE4E5B9u;
  hi = static_cast<uint32_t>(low_product >> 32) + lo * 0xBF58476Du + hi * 0x1CE4E5B9u;
  lo = static_cast<uint32_t>(low_product);
  // z ^= z >> 27; the high word of z * 0x94D049BB133111EB
  lo ^= (lo >> 27) | (hi << 5), hi ^= hi >> 27;
  const uint32_t top = static_cast<uint32_t>((static_cast<uint64_t>(lo) * 0x133111EBu) >> 32) + lo * 0x94D049BBu +
                       hi * 0x133111EBu;
  return (top >> (32 - kDropoutBits)) >= threshold;
}

CONVBERT_FAST_HOST_DEVICE bool dropout_keeps_mixed(uint64_t z, uint32_t threshold) {
#if defined(__CUDA_ARCH__)
  return dropout_keeps_words(static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32), threshold);
#else  // a CPU multiplies 64-bit words at once
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> (64 - kDropoutBits)) >= threshold;
#endif
}

CONVBERT_FAST_HOST_DEVICE bool dropout_keeps(uint64_t seed, uint64_t index, uint32_t threshold) {
  return dropout_keeps_mixed(seed + (index + 1) * kDropoutStep, threshold);
}

}  // namespace convbert_fast
