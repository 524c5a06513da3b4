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

CONVBERT_FAST_HOST_DEVICE bool dropout_keeps(uint64_t seed, uint64_t index, uint32_t threshold) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> (64 - kDropoutBits)) >= threshold;
}

}  // namespace convbert_fast
