// The depthwise conv on [B, L, C], tiled (the v2 kernels; depthwise_conv.cuh's general ones take the other
// shapes). A warp owns (batch, tile of tokens, 32 x N channels): lane l channels N l .. N l + N - 1 of the
// group, read as one vector. The K taps of its channels sit in registers, the K input rows a token needs in a
// ring of registers (each row loaded once per tile, plus K - 1 halo rows), the loop unrolled at compile time
// (K fixed) so the ring costs no moves and nothing divides. Offsets inside a sequence are 32-bit, from a
// 64-bit base: the launcher checks (L + tile) * C fits.
#pragma once
#include "vector_io.cuh"

namespace convbert_fast {

constexpr int kDepthwiseWarps = 4;
constexpr int kDepthwiseTile = 32;  // forward: tokens per warp
constexpr int kDepthwiseVec = 4;    // forward: channels per lane
constexpr int kWeightGradChunk = 128;  // weight gradient: tokens per partial sum
constexpr int kWeightGradVec = 2;      // weight gradient: channels per lane (more warps in flight)

// Task = (batch * tiles + tile) * groups + group: a block's warps take neighbouring channel groups of a tile.
struct DepthwiseTask {
  int batch, tile, channel;
};
template <int N>
__device__ __forceinline__ DepthwiseTask depthwise_task(int task, int tiles, int groups, int lane) {
  const int bt = task / groups, group = task - bt * groups;
  return {bt / tiles, bt % tiles, (group * 32 + lane) * N};
}

// out[b, t, c] = sum_j taps[j, c] * x[b, t + j - K/2, c], zero padding; fp32 accumulation in tap order.
template <typename T, int K, bool Vector>
__global__ void __launch_bounds__(kDepthwiseWarps * 32)
    depthwise_conv_forward_tiled_kernel(const T* __restrict__ x, const T* __restrict__ taps, T* __restrict__ out,
                                        int tasks, int tiles, int groups, int seq_len, int channels) {
  using A = typename AccType<T>::type;
  constexpr int N = kDepthwiseVec, half = K / 2;
  const int lane = threadIdx.x & 31, task = blockIdx.x * kDepthwiseWarps + (threadIdx.x >> 5);
  if (task >= tasks) return;
  const DepthwiseTask at = depthwise_task<N>(task, tiles, groups, lane);
  const int count = channels - at.channel, t0 = at.tile * kDepthwiseTile;
  const bool on = count > 0;
  A w[K][N];
#pragma unroll
  for (int j = 0; j < K; ++j) load_vec<T, N, Vector>(taps + j * channels + at.channel, on, count, w[j]);
  const int64_t sequence = static_cast<int64_t>(at.batch) * seq_len * channels + at.channel;
  const T* src = x + sequence + (t0 - half) * channels;
  T* dst = out + sequence + t0 * channels;
  A ring[K][N];  // row t0 - half + i in ring[i % K]
  int r = t0 - half;
#pragma unroll
  for (int i = 0; i < kDepthwiseTile + K - 1; ++i, ++r, src += channels) {
    load_vec<T, N, Vector>(src, on && static_cast<unsigned>(r) < static_cast<unsigned>(seq_len), count, ring[i % K]);
    if (i >= K - 1) {  // token t0 + k: rows t0 + k - half + j are ring[(k + j) % K]
      const int k = i - (K - 1);
      A acc[N];
#pragma unroll
      for (int q = 0; q < N; ++q) acc[q] = A(0);
#pragma unroll
      for (int j = 0; j < K; ++j) {
#pragma unroll
        for (int q = 0; q < N; ++q) acc[q] += w[j][q] * ring[(k + j) % K][q];
      }
      store_vec<T, N, Vector>(dst, on && t0 + k < seq_len, count, acc);
      dst += channels;
    }
  }
}

// partials[b * chunks + chunk, j, c] = sum over the chunk's tokens s of grad[b, s, c] * x[b, s + j - K/2, c]
// (fp32; fp64 for fp64), summed over chunks by the caller in a fixed order: deterministic, no atomics. Rows
// outermost, K x N accumulators per lane; the x rows in a ring, the loop body K tokens (one turn of the ring).
template <typename T, int K, bool Vector>
__global__ void __launch_bounds__(kDepthwiseWarps * 32)
    depthwise_conv_weight_grad_tiled_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                            typename AccType<T>::type* __restrict__ partials, int tasks, int chunks,
                                            int groups, int seq_len, int channels) {
  using A = typename AccType<T>::type;
  constexpr int N = kWeightGradVec, half = K / 2;
  const int lane = threadIdx.x & 31, task = blockIdx.x * kDepthwiseWarps + (threadIdx.x >> 5);
  if (task >= tasks) return;
  const DepthwiseTask at = depthwise_task<N>(task, chunks, groups, lane);
  const int count = channels - at.channel, s0 = at.tile * kWeightGradChunk;
  const int s_end = min(s0 + kWeightGradChunk, seq_len);
  const bool on = count > 0;
  const int64_t sequence = static_cast<int64_t>(at.batch) * seq_len * channels + at.channel;
  const T* xs = x + sequence + (s0 - half) * channels;
  const T* gs = grad + sequence + s0 * channels;
  A acc[K][N];
#pragma unroll
  for (int j = 0; j < K; ++j) {
#pragma unroll
    for (int q = 0; q < N; ++q) acc[j][q] = A(0);
  }
  A ring[K][N];  // row s0 - half + i in ring[i % K]
  int r = s0 - half;
#pragma unroll
  for (int i = 0; i < K - 1; ++i, ++r, xs += channels) {
    load_vec<T, N, Vector>(xs, on && static_cast<unsigned>(r) < static_cast<unsigned>(seq_len), count, ring[i]);
  }
#pragma unroll 1
  for (int base = 0; base < kWeightGradChunk; base += K) {  // base % K == 0: the ring's slots are fixed
#pragma unroll
    for (int u = 0; u < K; ++u, ++r, xs += channels, gs += channels) {
      load_vec<T, N, Vector>(xs, on && static_cast<unsigned>(r) < static_cast<unsigned>(seq_len), count,
                             ring[(u + K - 1) % K]);
      if (s0 + base + u < s_end) {  // the same for the whole warp
        A g[N];
        load_vec<T, N, Vector>(gs, on, count, g);
#pragma unroll
        for (int j = 0; j < K; ++j) {  // token s = s0 + base + u reads rows s - half + j: ring[(u + j) % K]
#pragma unroll
          for (int q = 0; q < N; ++q) acc[j][q] += g[q] * ring[(u + j) % K][q];
        }
      }
    }
  }
  if (!on) return;
  A* dst = partials + (static_cast<int64_t>(at.batch) * chunks + at.tile) * K * channels + at.channel;
#pragma unroll
  for (int j = 0; j < K; ++j) {
#pragma unroll
    for (int q = 0; q < N; ++q) {
      if (Vector || q < count) dst[j * channels + q] = acc[j][q];
    }
  }
}

}  // namespace convbert_fast
