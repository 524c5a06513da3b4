// The depthwise half of the separable conv on the [B, L, C] layout, taps stored [K, C]; two sets of kernels while
// both stay (launchers.h: CONVBERT_FAST_CUDA_KERNELS).
// v1, general: one thread per output element, consecutive threads on consecutive channels (coalesced).
// v2, tiled (K = 9): a warp owns (batch, tile of tokens, 32 x N channels), lane l channels N l .. N l + N - 1 of
// the group, read as one vector. The K taps of its channels sit in registers, the K input rows a token needs in
// a ring of registers (each row loaded once per tile, plus K - 1 halo rows), the loop unrolled at compile time
// (K fixed) so the ring costs no moves and nothing divides. Offsets inside a sequence are 32-bit, from a 64-bit
// base: the launcher checks (L + tile) * C fits.
// The kernels, then their launchers (torch-free; nvcc only: tests/emulation/tiled_kernels.cpp compiles the
// kernels with g++).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "common.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace convbert_fast {

// Packed: B = 1 and offsets bound the sequences (launchers.h).
template <typename T, int KS, bool Packed>
__global__ void depthwise_conv_forward_kernel(const T* __restrict__ x, const T* __restrict__ taps, T* __restrict__ out,
                                              int64_t rows, int64_t seq_len, int64_t channels, int kernel_size,
                                              const int32_t* __restrict__ offsets, int sequences) {
  using A = typename AccType<T>::type;
  const int K = KS > 0 ? KS : kernel_size, half = K / 2;
  const int64_t total = rows * channels;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / channels, c = i - row * channels;
    const RowPosition at = locate_row<Packed>(offsets, sequences, row, seq_len);
    A acc = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {  // fully unrolled when K is the compile-time KS
      const int64_t source = at.t + j - half;
      if (source >= 0 && source < at.length) {
        acc += to_acc(taps[j * channels + c]) * to_acc(x[(row + j - half) * channels + c]);
      }
    }
    out[i] = from_acc<T>(acc);
  }
}

// One block column per channel range, one block row per chunk of rows: partial sums per (chunk, tap,
// channel), added up afterwards in chunk order (deterministic, no atomics). Packed: the sequence of the rows walked
// is looked up again only where the walk leaves it.
template <typename T, bool Packed>
__global__ void depthwise_conv_weight_grad_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                                  typename AccType<T>::type* __restrict__ partials, int64_t rows,
                                                  int64_t seq_len, int64_t channels, int kernel_size,
                                                  int64_t chunk_rows, const int32_t* __restrict__ offsets,
                                                  int sequences) {
  using A = typename AccType<T>::type;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const int64_t chunk = blockIdx.y, begin = chunk * chunk_rows;
  const int64_t end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
  const int half = kernel_size / 2;
  for (int j = 0; j < kernel_size; ++j) {
    A acc = 0;
    if constexpr (!Packed) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t source = row % seq_len + j - half;
        if (source >= 0 && source < seq_len) {
          acc += to_acc(grad[row * channels + c]) * to_acc(x[(row + j - half) * channels + c]);
        }
      }
    } else {
      SequenceBounds s{0, 0};
      for (int64_t row = begin; row < end; ++row) {
        if (row >= s.hi) s = sequence_of(offsets, sequences, row, rows);
        const int64_t source = row + j - half;
        if (source >= s.lo && source < s.hi) {
          acc += to_acc(grad[row * channels + c]) * to_acc(x[source * channels + c]);
        }
      }
    }
    partials[(chunk * kernel_size + j) * channels + c] = acc;
  }
}

// The tiled kernels' geometry: plan.h (kDepthwiseWarps, kDepthwiseTile, kDepthwiseVec, kWeightGradChunk,
// kWeightGradVec).
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
// Packed (cu_seqlens; B = 1): the tile runs across sequence boundaries; lane k finds the taps of token t0 + k inside
// its sequence (taps_inside), and each token takes its bits from that lane; a tap outside adds nothing (a
// predicate, not a zero: a neighbour's inf or NaN must not reach it).
template <typename T, int K, bool Vector, bool Packed>
__global__ void __launch_bounds__(kDepthwiseWarps * 32)
    depthwise_conv_forward_tiled_kernel(const T* __restrict__ x, const T* __restrict__ taps, T* __restrict__ out,
                                        int tasks, int tiles, int groups, int seq_len, int channels,
                                        const int32_t* __restrict__ offsets, int sequences) {
  using A = typename AccType<T>::type;
  constexpr int N = kDepthwiseVec, half = K / 2;
  static_assert(kDepthwiseTile == 32, "a lane per token of the tile");
  const int lane = threadIdx.x & 31, task = blockIdx.x * kDepthwiseWarps + (threadIdx.x >> 5);
  if (task >= tasks) return;  // whole warps leave together
  const DepthwiseTask at = depthwise_task<N>(task, tiles, groups, lane);
  const int count = channels - at.channel, t0 = at.tile * kDepthwiseTile;
  const bool on = count > 0;
  uint32_t lane_inside = 0;  // packed: the taps of token t0 + lane inside its sequence
  if (Packed && t0 + lane < seq_len) lane_inside = taps_inside<K>(offsets, sequences, t0 + lane, seq_len);
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
      const uint32_t inside = Packed ? __shfl_sync(0xffffffffu, lane_inside, k) : ~0u;
      A acc[N];
#pragma unroll
      for (int q = 0; q < N; ++q) acc[q] = A(0);
#pragma unroll
      for (int n = 0; n < K; ++n) {
        const int j = tap_order<K, Packed>(n);
        if (!Packed || tap_inside<K>(inside, j)) {
#pragma unroll
          for (int q = 0; q < N; ++q) acc[q] += w[j][q] * ring[(k + j) % K][q];
        }
      }
      store_vec<T, N, Vector>(dst, on && t0 + k < seq_len, count, acc);
      dst += channels;
    }
  }
}

// partials[b * chunks + chunk, j, c] = sum over the chunk's tokens s of grad[b, s, c] * x[b, s + j - K/2, c]
// (fp32; fp64 for fp64), summed over chunks by the caller in a fixed order: deterministic, no atomics. Rows
// outermost, K x N accumulators per lane; the x rows in a ring, the loop body K tokens (one turn of the ring).
// Packed (B = 1): the chunk runs across sequence boundaries; its tokens' taps inside their sequences are found
// first, 4 per lane, into shared memory, from where each token's bits are broadcast; a tap outside adds nothing.
template <typename T, int K, bool Vector, bool Packed>
__global__ void __launch_bounds__(kDepthwiseWarps * 32)
    depthwise_conv_weight_grad_tiled_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                            typename AccType<T>::type* __restrict__ partials, int tasks, int chunks,
                                            int groups, int seq_len, int channels,
                                            const int32_t* __restrict__ offsets, int sequences) {
  using A = typename AccType<T>::type;
  constexpr int N = kWeightGradVec, half = K / 2;
  __shared__ uint16_t inside_smem[kDepthwiseWarps][Packed ? kWeightGradChunk : 1];
  static_assert(K <= 16, "a tap mask in 16 bits");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, task = blockIdx.x * kDepthwiseWarps + warp;
  if (task >= tasks) return;  // whole warps leave together
  const DepthwiseTask at = depthwise_task<N>(task, chunks, groups, lane);
  const int count = channels - at.channel, s0 = at.tile * kWeightGradChunk;
  const int s_end = min(s0 + kWeightGradChunk, seq_len);
  const bool on = count > 0;
  uint16_t* inside = inside_smem[warp];
  if constexpr (Packed) {
#pragma unroll
    for (int n = lane; n < kWeightGradChunk; n += 32) {
      inside[n] = s0 + n < s_end ? static_cast<uint16_t>(taps_inside<K>(offsets, sequences, s0 + n, seq_len)) : 0;
    }
    __syncwarp();
  }
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
        const uint32_t taps_in = Packed ? inside[base + u] : ~0u;
#pragma unroll
        for (int j = 0; j < K; ++j) {  // token s = s0 + base + u reads rows s - half + j: ring[(u + j) % K]
          if (!Packed || tap_inside<K>(taps_in, j)) {
#pragma unroll
            for (int q = 0; q < N; ++q) acc[j][q] += g[q] * ring[(u + j) % K][q];
          }
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

#if defined(__CUDACC__)
namespace {

template <typename T, bool Vector, bool Packed>
void forward_tiled(const DepthwisePlan& plan, const void* x, const void* taps, void* out, int64_t seq_len,
                   int64_t channels, const int32_t* offsets, int64_t sequences, cudaStream_t stream) {
  depthwise_conv_forward_tiled_kernel<T, 9, Vector, Packed><<<plan.blocks, plan.threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(taps), static_cast<T*>(out), static_cast<int>(plan.tasks),
      static_cast<int>(plan.tiles), static_cast<int>(plan.groups), static_cast<int>(seq_len),
      static_cast<int>(channels), offsets, static_cast<int>(sequences));
}

template <typename T, bool Vector, bool Packed>
void weight_grad_tiled(const WeightGradPlan& plan, const void* grad, const void* x, void* partials, int64_t seq_len,
                       int64_t channels, const int32_t* offsets, int64_t sequences, cudaStream_t stream) {
  depthwise_conv_weight_grad_tiled_kernel<T, 9, Vector, Packed><<<plan.blocks_x, plan.threads, 0, stream>>>(
      static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<typename AccType<T>::type*>(partials),
      static_cast<int>(plan.tasks), static_cast<int>(plan.row_chunks), static_cast<int>(plan.groups),
      static_cast<int>(seq_len), static_cast<int>(channels), offsets, static_cast<int>(sequences));
}

template <typename T>
void forward(const DepthwisePlan& plan, const void* x, const void* taps, void* out, int64_t batch, int64_t seq_len,
             int64_t channels, int64_t kernel_size, const int32_t* offsets, int64_t sequences, cudaStream_t stream) {
  if (plan.tiled) {
    const bool aligned = depthwise_forward_vectors(sizeof(T), x, taps, out, channels);
    CONVBERT_FAST_WITH_PACKED(offsets, Packed,
      if (aligned) forward_tiled<T, true, Packed>(plan, x, taps, out, seq_len, channels, offsets, sequences, stream);
      else forward_tiled<T, false, Packed>(plan, x, taps, out, seq_len, channels, offsets, sequences, stream))
    return;
  }
  CONVBERT_FAST_WITH_PACKED(offsets, Packed, CONVBERT_FAST_WITH_KERNEL_SIZE(kernel_size, KS,
      depthwise_conv_forward_kernel<T, KS, Packed><<<plan.blocks, plan.threads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(taps), static_cast<T*>(out), batch * seq_len, seq_len,
          channels, static_cast<int>(kernel_size), offsets, static_cast<int>(sequences))))
}

template <typename T>
void weight_grad(const WeightGradPlan& plan, const void* grad, const void* x, void* partials, int64_t batch,
                 int64_t seq_len, int64_t channels, int64_t kernel_size, const int32_t* offsets, int64_t sequences,
                 cudaStream_t stream) {
  if (plan.tiled) {
    const bool aligned = depthwise_weight_grad_vectors(sizeof(T), grad, x, channels);
    CONVBERT_FAST_WITH_PACKED(offsets, Packed,
      if (aligned) {
        weight_grad_tiled<T, true, Packed>(plan, grad, x, partials, seq_len, channels, offsets, sequences, stream);
      } else {
        weight_grad_tiled<T, false, Packed>(plan, grad, x, partials, seq_len, channels, offsets, sequences, stream);
      })
    return;
  }
  const dim3 grid(static_cast<unsigned>(plan.blocks_x), static_cast<unsigned>(plan.blocks_y));
  CONVBERT_FAST_WITH_PACKED(offsets, Packed,
    depthwise_conv_weight_grad_kernel<T, Packed><<<grid, plan.threads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<typename AccType<T>::type*>(partials),
        batch * seq_len, seq_len, channels, static_cast<int>(kernel_size), plan.chunk_rows, offsets,
        static_cast<int>(sequences)))
}

}  // namespace

cudaError_t kernel_image_for_current_device() {
  // every .cu holds code for the same architectures (one arch list): one kernel of one of them answers for all
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, depthwise_conv_forward_kernel<float, 0, false>);
  cudaGetLastError();  // not sticky, but recorded: cleared, so that the next launch's check does not see it
  return status;
}

cudaError_t depthwise_conv_forward(KernelChoice kernels, DType dtype, const void* x, const void* taps, void* out,
                                   int64_t batch, int64_t seq_len, int64_t channels, int64_t kernel_size,
                                   const int32_t* offsets, int64_t sequences, cudaStream_t stream) {
  if (!packed_sequences_valid(batch, seq_len, offsets, sequences)) return cudaErrorInvalidValue;
  if (batch * seq_len * channels == 0) return cudaSuccess;
  const DepthwisePlan plan = depthwise_forward_plan(kernels, batch, seq_len, channels, kernel_size);
  CONVBERT_FAST_DISPATCH(dtype, forward, plan, x, taps, out, batch, seq_len, channels, kernel_size, offsets,
                         sequences, stream)
  return cudaGetLastError();
}

cudaError_t depthwise_conv_weight_grad_partials(KernelChoice kernels, DType dtype, const void* grad, const void* x,
                                                void* partials, int64_t batch, int64_t seq_len, int64_t channels,
                                                int64_t kernel_size, const int32_t* offsets, int64_t sequences,
                                                cudaStream_t stream) {
  if (!packed_sequences_valid(batch, seq_len, offsets, sequences)) return cudaErrorInvalidValue;
  if (channels == 0 || batch * seq_len == 0) return cudaSuccess;
  const WeightGradPlan plan = depthwise_weight_grad_plan(kernels, batch, seq_len, channels, kernel_size);
  CONVBERT_FAST_DISPATCH(dtype, weight_grad, plan, grad, x, partials, batch, seq_len, channels, kernel_size, offsets,
                         sequences, stream)
  return cudaGetLastError();
}
#endif  // __CUDACC__

}  // namespace convbert_fast
