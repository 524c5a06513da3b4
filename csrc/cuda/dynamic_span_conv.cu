// The dynamic span conv, two sets of kernels while both stay (launchers.h: CONVBERT_FAST_CUDA_KERNELS).
// v1, general: one warp per (token row, head) computes that head's softmax over its K logits into shared memory,
// then each lane accumulates D/32 channels over the K taps in fp32; value rows are re-read by the K neighbouring
// warps from cache.
// v2, tiled (K = 9, head_size <= 64): one warp per (batch, head, tile of 64 tokens); each half-warp runs along
// 32 consecutive tokens, its lane s owning the head's channels 4s .. 4s + 3, read as one vector (8 bytes in
// bf16). The tile's softmax runs one lane per token into shared memory, from where each token's K weights are
// broadcast as 16-byte loads. The K rows a token needs sit in a ring of registers, so a run loads each of its
// 32 + K - 1 rows once; the loop is unrolled at compile time (K fixed), so the ring costs no moves. Offsets inside
// a sequence are 32-bit (pointers step by a row), from a 64-bit base per (batch, head): the launcher checks they
// fit. Nothing of size K x values is materialised by either.
// The kernels, then their launchers (torch-free; nvcc only: tests/emulation/tiled_kernels.cpp compiles the
// kernels with g++).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "common.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace convbert_fast {

constexpr int kSpanMaxKernel = kMaxCudaKernelSize + 1;  // the softmax scratch per warp: two logits per lane

// Softmax of the K (<= kMaxCudaKernelSize) logits at `logits` into weights[0, K), by one warp; as
// torch.softmax: x - max.
template <typename T, typename A>
__device__ __forceinline__ void warp_softmax(const T* logits, A* weights, int kernel_size, int lane) {
  const A neg_inf = -static_cast<A>(INFINITY);
  const A a = lane < kernel_size ? to_acc(logits[lane]) : neg_inf;
  const A b = lane + 32 < kernel_size ? to_acc(logits[lane + 32]) : neg_inf;
  const A max_logit = warp_max(a > b ? a : b);
  const A ea = lane < kernel_size ? exp(a - max_logit) : A(0);
  const A eb = lane + 32 < kernel_size ? exp(b - max_logit) : A(0);
  const A total = warp_sum(ea + eb);
  if (lane < kernel_size) weights[lane] = ea / total;
  if (lane + 32 < kernel_size) weights[lane + 32] = eb / total;
  __syncwarp();
}

// KS > 0 fixes the kernel size at compile time (unrolled taps); KS == 0 reads it from kernel_size. Packed: B = 1 and
// offsets bound the sequences (launchers.h).
template <typename T, int KS, bool Packed>
__global__ void __launch_bounds__(kSpanWarpsPerBlock * 32)
    span_conv_forward_kernel(const T* __restrict__ values, const T* __restrict__ logits, T* __restrict__ out,
                             int64_t batch, int64_t seq_len, int heads, int head_size, int kernel_size,
                             int64_t values_batch_stride, int64_t values_row_stride, int64_t out_batch_stride,
                             int64_t out_row_stride, const int32_t* __restrict__ offsets, int sequences) {
  using A = typename AccType<T>::type;
  __shared__ A weights_smem[kSpanWarpsPerBlock][kSpanMaxKernel];
  const int K = KS > 0 ? KS : kernel_size;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kSpanWarpsPerBlock + warp;  // row * heads + h
  if (task >= batch * seq_len * heads) return;  // whole warps leave together
  const int64_t row = task / heads, t = row % seq_len;
  const int h = static_cast<int>(task % heads), half = K / 2;
  A* weights = weights_smem[warp];
  warp_softmax(logits + task * K, weights, K, lane);
  // taps j in [first, last) read rows inside the row's sequence; the zero padding adds nothing
  const RowPosition at = locate_row<Packed>(offsets, sequences, row, seq_len);
  const int first = at.t < half ? static_cast<int>(half - at.t) : 0;
  const int last = at.length - at.t + half < K ? static_cast<int>(at.length - at.t + half) : K;
  const T* head_values = values + (row / seq_len) * values_batch_stride + h * head_size;
  T* out_row = out + (row / seq_len) * out_batch_stride + t * out_row_stride + h * head_size;
  for (int d = lane; d < head_size; d += 32) {
    A acc = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {  // fully unrolled when K is the compile-time KS
      if (j >= first && j < last) acc += weights[j] * to_acc(head_values[(t + j - half) * values_row_stride + d]);
    }
    out_row[d] = from_acc<T>(acc);
  }
}

// Pass 1 of the backward: d(logits) through the softmax, one warp per (row, head). The K dot products
// grad . values over the head's channels are warp sums (fixed order: deterministic). Keeps the weights.
template <typename T, int KS, bool Packed>
__global__ void __launch_bounds__(kSpanWarpsPerBlock * 32)
    span_conv_backward_logits_kernel(const T* __restrict__ grad, const T* __restrict__ values,
                                     const T* __restrict__ logits, T* __restrict__ grad_logits,
                                     typename AccType<T>::type* __restrict__ weights_out, int64_t batch,
                                     int64_t seq_len, int heads, int head_size, int kernel_size,
                                     int64_t values_batch_stride, int64_t values_row_stride,
                                     const int32_t* __restrict__ offsets, int sequences) {
  using A = typename AccType<T>::type;
  __shared__ A weights_smem[kSpanWarpsPerBlock][kSpanMaxKernel];
  __shared__ A grad_weights_smem[kSpanWarpsPerBlock][kSpanMaxKernel];
  const int K = KS > 0 ? KS : kernel_size;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kSpanWarpsPerBlock + warp;
  if (task >= batch * seq_len * heads) return;
  const int64_t row = task / heads, t = row % seq_len;
  const int h = static_cast<int>(task % heads), half = K / 2;
  const int64_t width = static_cast<int64_t>(heads) * head_size;
  A* weights = weights_smem[warp];
  A* grad_weights = grad_weights_smem[warp];
  warp_softmax(logits + task * K, weights, K, lane);
  const T* grad_row = grad + row * width + h * head_size;
  const T* head_values = values + (row / seq_len) * values_batch_stride + h * head_size;
  const RowPosition at = locate_row<Packed>(offsets, sequences, row, seq_len);
  for (int j = 0; j < K; ++j) {
    const int64_t source = at.t + j - half;  // position inside the sequence
    A partial = 0;
    if (source >= 0 && source < at.length) {
      for (int d = lane; d < head_size; d += 32) {
        partial += to_acc(grad_row[d]) * to_acc(head_values[(t + j - half) * values_row_stride + d]);
      }
    }
    partial = warp_sum(partial);
    if (lane == 0) grad_weights[j] = partial;
  }
  __syncwarp();
  A weighted = 0;
  for (int j = lane; j < K; j += 32) weighted += weights[j] * grad_weights[j];
  weighted = warp_sum(weighted);
  for (int j = lane; j < K; j += 32) {
    grad_logits[task * K + j] = from_acc<T>(weights[j] * (grad_weights[j] - weighted));
    weights_out[task * K + j] = weights[j];
  }
}

// Pass 2: d(values) as the transposed span, one warp per (row s, head): s gathers the K rows
// t = s - j + K/2 whose tap j read it. No atomics.
template <typename T, int KS, bool Packed>
__global__ void __launch_bounds__(kSpanWarpsPerBlock * 32)
    span_conv_backward_values_kernel(const T* __restrict__ grad, const typename AccType<T>::type* __restrict__ weights,
                                     T* __restrict__ grad_values, int64_t batch, int64_t seq_len, int heads,
                                     int head_size, int kernel_size, const int32_t* __restrict__ offsets,
                                     int sequences) {
  using A = typename AccType<T>::type;
  const int K = KS > 0 ? KS : kernel_size;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kSpanWarpsPerBlock + warp;
  if (task >= batch * seq_len * heads) return;
  const int64_t row = task / heads;
  const int h = static_cast<int>(task % heads), half = K / 2;
  const int64_t width = static_cast<int64_t>(heads) * head_size;
  // tap j of row t = s - j + half reads row s; t must lie in s's sequence
  const RowPosition at = locate_row<Packed>(offsets, sequences, row, seq_len);
  const int64_t s = at.t;
  const int first = s + half - (at.length - 1) > 0 ? static_cast<int>(s + half - (at.length - 1)) : 0;
  const int last = s + half + 1 < K ? static_cast<int>(s + half + 1) : K;
  for (int d = lane; d < head_size; d += 32) {
    A acc = 0;
    for (int j = first; j < last; ++j) {
      const int64_t source = row - j + half;
      acc += weights[(source * heads + h) * K + j] * to_acc(grad[source * width + h * head_size + d]);
    }
    grad_values[row * width + h * head_size + d] = from_acc<T>(acc);
  }
}

// The tiled kernels' warps per block (plan.h: kSpanTile tokens per warp, kSpanRun per half-warp).
template <typename T>
constexpr int span_tile_warps() {
  return span_tile_warps(sizeof(typename AccType<T>::type));
}

// Row stride of a token's weights in shared memory: K rounded up to whole 16-byte vectors.
template <typename A, int K>
constexpr int padded_taps() {
  return (K * static_cast<int>(sizeof(A)) + 15) / 16 * 16 / static_cast<int>(sizeof(A));
}

// w = softmax(logits[0, K)) (x - max, as torch.softmax; times 1 / sum: one division, not K), zeros when
// !valid. One lane, one token.
template <typename T, int K>
__device__ __forceinline__ void token_softmax(const T* logits, bool valid, typename AccType<T>::type (&w)[K]) {
  using A = typename AccType<T>::type;
#pragma unroll
  for (int j = 0; j < K; ++j) w[j] = valid ? to_acc(logits[j]) : A(0);
  A top = w[0];
#pragma unroll
  for (int j = 1; j < K; ++j) top = w[j] > top ? w[j] : top;
  A total = 0;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    w[j] = exp(w[j] - top);
    total += w[j];
  }
  const A scale = valid ? A(1) / total : A(0);
#pragma unroll
  for (int j = 0; j < K; ++j) w[j] *= scale;
}

// w[0, KP) from a 16-byte-aligned shared-memory row of KP (a whole number of 16-byte vectors) values.
template <typename A, int KP>
__device__ __forceinline__ void load_taps(const A* row, A (&w)[KP]) {
#pragma unroll
  for (int q = 0; q < KP * static_cast<int>(sizeof(A)) / 16; ++q) {
    if constexpr (sizeof(A) == 4) {
      const float4 v = reinterpret_cast<const float4*>(row)[q];
      w[4 * q] = v.x, w[4 * q + 1] = v.y, w[4 * q + 2] = v.z, w[4 * q + 3] = v.w;
    } else {
      const double2 v = reinterpret_cast<const double2*>(row)[q];
      w[2 * q] = v.x, w[2 * q + 1] = v.y;
    }
  }
}

// Reduce-scatter of 32 values over groups of 2 x Offset lanes: each level halves the values a lane holds and
// adds its partner's half (one shuffle and two selects per value kept), in a fixed order. From <16, 16> lane l
// ends with the sum of v[l] over the warp in v[0]; from <16, 8>, lane l with the sums of v[2 (l % 16)] and
// v[2 (l % 16) + 1] over its half-warp in v[0], v[1]. One template per level: a loop over the levels left v in
// local memory (its selects became selects of addresses).
template <int Keep, int Offset, typename A>
__device__ __forceinline__ void reduce_scatter(A (&v)[32], int lane) {
  const bool upper = (lane & Offset) != 0;
#pragma unroll
  for (int i = 0; i < Keep; ++i) {
    const A a = v[i], b = v[i + Keep];
    const A send = upper ? a : b;
    const A keep = upper ? b : a;
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, Offset);
  }
  if constexpr (Offset > 1) reduce_scatter<Keep / 2, Offset / 2>(v, lane);
}

// Which (batch, head, tile) a warp owns: tasks are ordered tile-fastest, so a block's warps share halo rows.
struct SpanTask {
  int batch, head, t0;
};
__device__ __forceinline__ SpanTask span_task(int task, int tiles, int heads) {
  const int bh = task / tiles;
  return {bh / heads, bh % heads, (task - bh * tiles) * kSpanTile};
}

// Packed (cu_seqlens; B = 1): tiles run over the packed row, across sequence boundaries; each token keeps the bits
// of its taps inside its own sequence (taps_inside) in the padding after its K weights, and a tap outside adds
// nothing (a predicate, not a zero weight: a neighbour's inf or NaN must not reach it).
template <typename T, int K, bool Vector, bool Packed>
__global__ void __launch_bounds__(span_tile_warps<T>() * 32)
    span_conv_forward_tiled_kernel(const T* __restrict__ values, const T* __restrict__ logits, T* __restrict__ out,
                                   int tasks, int tiles, int seq_len, int heads, int head_size,
                                   int64_t values_batch_stride, int values_row_stride, int64_t out_batch_stride,
                                   int out_row_stride, const int32_t* __restrict__ offsets, int sequences) {
  using A = typename AccType<T>::type;
  constexpr int KP = padded_taps<A, K>(), half = K / 2, warps = span_tile_warps<T>();
  static_assert(!Packed || KP > K, "the tap mask lives in the padding");
  __shared__ __align__(16) A taps_smem[warps][kSpanTile * KP];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int task = blockIdx.x * warps + warp;
  if (task >= tasks) return;  // whole warps leave together
  const SpanTask at = span_task(task, tiles, heads);
  A* taps = taps_smem[warp];
#pragma unroll
  for (int round = 0; round < kSpanTile / 32; ++round) {  // token t0 + k, one per lane
    const int k = round * 32 + lane, t = at.t0 + k;
    A w[K];
    token_softmax<T, K>(logits + (static_cast<int64_t>(at.batch) * seq_len + t) * (heads * K) + at.head * K,
                        t < seq_len, w);
#pragma unroll
    for (int j = 0; j < K; ++j) taps[k * KP + j] = w[j];
    if constexpr (Packed) {
      taps[k * KP + K] = mask_as_acc(t < seq_len ? taps_inside<K>(offsets, sequences, t, seq_len) : 0u, A(0));
    }
  }
  __syncwarp();
  const int run = lane >> 4, c = 4 * (lane & 15), count = head_size - c;
  const int first = at.t0 + run * kSpanRun;  // this half-warp's first token
  const T* v = values + at.batch * values_batch_stride + (first - half) * values_row_stride + at.head * head_size + c;
  T* o = out + at.batch * out_batch_stride + first * out_row_stride + at.head * head_size + c;
  const A* run_taps = taps + run * kSpanRun * KP;
  A ring[K][4];  // row first - half + i in ring[i % K]
  int r = first - half;
#pragma unroll
  for (int i = 0; i < kSpanRun + K - 1; ++i, ++r, v += values_row_stride) {
    load_vec<T, 4, Vector>(v, count > 0 && static_cast<unsigned>(r) < static_cast<unsigned>(seq_len), count,
                             ring[i % K]);
    if (i >= K - 1) {  // token first + k: its rows first + k - half + j are ring[(k + j) % K]
      const int k = i - (K - 1);
      A w[KP];
      load_taps(run_taps + k * KP, w);
      const uint32_t inside = Packed ? acc_as_mask(w[K]) : ~0u;
      A acc[4] = {0, 0, 0, 0};
#pragma unroll
      for (int n = 0; n < K; ++n) {
        const int j = tap_order<K, Packed>(n);
        if (!Packed || tap_inside<K>(inside, j)) {
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[q] += w[j] * ring[(k + j) % K][q];
        }
      }
      store_vec<T, 4, Vector, true>(o, count > 0 && first + k < seq_len, count, acc);
      o += out_row_stride;
    }
  }
}

// Both gradients in one pass over the tile, nothing materialised between them:
//   d(values)[s] = sum_j w[s + half - j][j] * grad[s + half - j]   (the transposed span; no atomics)
//   d(w)[s][j]  = grad[s] . values[s + j - half]                    (lane partials, reduce-scattered)
//   d(logits)[s][j] = w[s][j] * (d(w)[s][j] - sum_i w[s][i] d(w)[s][i])
// The softmax runs for the tile's 64 tokens and its K - 1 halo tokens; grad is read through its strides.
// Up to 168 registers (3 blocks of 4 warps per SM): the two rings and 32 partials need ~130, and ptxas' own
// choice (128) spilled.
// Packed: own[k]'s padding holds token t0 + k's taps inside its sequence (taps_inside), and d(w) of a tap outside
// is set to 0 before d(logits) (selected, not multiplied: a neighbour's inf or NaN stays out). diag[k][j] is zeroed
// where the token it weighs lies in another sequence than row t0 + k, so d(values) runs the unpacked loop: a
// predicate per tap there took the issue ratio over budget (tools/kernel_cost.py). The one difference this leaves:
// a non-finite gradient row of one sequence reaches d(values) of the K/2 rows beside it in the next (0 x inf);
// every parameter's gradient of that step is non-finite then anyway (it sums over all the sequences).
template <typename T, int K, bool Vector, bool Packed>
__global__ void __launch_bounds__(span_tile_warps<T>() * 32, 3)
    span_conv_backward_tiled_kernel(const T* __restrict__ grad, const T* __restrict__ values,
                                    const T* __restrict__ logits, T* __restrict__ grad_values,
                                    T* __restrict__ grad_logits, int tasks, int tiles, int seq_len, int heads,
                                    int head_size, int64_t values_batch_stride, int values_row_stride,
                                    int64_t grad_batch_stride, int grad_row_stride,
                                    const int32_t* __restrict__ offsets, int sequences) {
  using A = typename AccType<T>::type;
  using A2 = std::conditional_t<sizeof(A) == 8, double2, float2>;
  constexpr int KP = padded_taps<A, K>(), half = K / 2, warps = span_tile_warps<T>();
  static_assert(!Packed || KP > K, "the tap masks live in the padding");
  // diag[k][j]: weight j of token t0 + k + half - j, the token whose tap j reads row t0 + k;
  // own[k][j]: weight j of token t0 + k; grad_taps[k * K + j]: d(w)[t0 + k][j]
  __shared__ __align__(16) A diag_smem[warps][kSpanTile * KP];
  __shared__ __align__(16) A own_smem[warps][kSpanTile * KP];
  __shared__ __align__(16) A grad_taps_smem[warps][kSpanTile * K];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int task = blockIdx.x * warps + warp;
  if (task >= tasks) return;
  const SpanTask at = span_task(task, tiles, heads);
  const int width = heads * head_size;
  A *diag = diag_smem[warp], *own = own_smem[warp], *grad_taps = grad_taps_smem[warp];
  for (int q = lane; q < kSpanTile + K - 1; q += 32) {  // token t0 - half + q
    const int t = at.t0 - half + q;
    A w[K];
    token_softmax<T, K>(logits + (static_cast<int64_t>(at.batch) * seq_len + t) * (heads * K) + at.head * K,
                        t >= 0 && t < seq_len, w);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int k = q + j - 2 * half;
      if (k >= 0 && k < kSpanTile) diag[k * KP + j] = w[j];
      if (q >= half && q < half + kSpanTile) own[(q - half) * KP + j] = w[j];
    }
  }
  if constexpr (Packed) {
    __syncwarp();  // diag's rows were written by other lanes
#pragma unroll
    for (int round = 0; round < kSpanTile / 32; ++round) {  // token t0 + k, one per lane
      const int k = round * 32 + lane, t = at.t0 + k;
      const uint32_t inside = t < seq_len ? taps_inside<K>(offsets, sequences, t, seq_len) : 0u;
      own[k * KP + K] = mask_as_acc(inside, A(0));
      const uint32_t readers = taps_reversed<K>(inside);  // whose taps read row t0 + k from inside their sequence
#pragma unroll
      for (int j = 0; j < K; ++j) {
        if (!tap_inside<K>(readers, j)) diag[k * KP + j] = A(0);
      }
    }
  }
  __syncwarp();
  const int run = lane >> 4, c = 4 * (lane & 15), count = head_size - c;
  const int first = at.t0 + run * kSpanRun;
  const T* g = grad + at.batch * grad_batch_stride + (first - half) * grad_row_stride + at.head * head_size + c;
  const T* v = values + at.batch * values_batch_stride + (first - half) * values_row_stride + at.head * head_size + c;
  T* gv = grad_values + static_cast<int64_t>(at.batch) * seq_len * width + first * width + at.head * head_size + c;
  const A* run_diag = diag + run * kSpanRun * KP;
  A* run_grad_taps = grad_taps + run * kSpanRun * K;
  A g_ring[K][4], v_ring[K][4];  // row first - half + i in slot i % K
  A partial[32];                 // d(w) lane partials: value m = k * K + j in partial[m % 32]
  int r = first - half;
#pragma unroll
  for (int i = 0; i < kSpanRun + K - 1; ++i, ++r, g += grad_row_stride, v += values_row_stride) {
    const bool row_on = count > 0 && static_cast<unsigned>(r) < static_cast<unsigned>(seq_len);
    load_vec<T, 4, Vector>(g, row_on, count, g_ring[i % K]);
    load_vec<T, 4, Vector>(v, row_on, count, v_ring[i % K]);
    if (i >= K - 1) {  // row s = first + k: rows s - half .. s + half are slots (k + j) % K
      const int k = i - (K - 1);
      A w[KP];
      load_taps(run_diag + k * KP, w);
      A acc[4] = {0, 0, 0, 0};
#pragma unroll
      for (int j = 0; j < K; ++j) {  // grad row s + half - j is slot (k + 2 half - j) % K
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[q] += w[j] * g_ring[(k + 2 * half - j) % K][q];
      }
      store_vec<T, 4, Vector, true>(gv, count > 0 && first + k < seq_len, count, acc);
      gv += width;
#pragma unroll
      for (int j = 0; j < K; ++j) {  // grad row s is slot (k + half) % K
        const int m = k * K + j;
        const A* gs = g_ring[(k + half) % K];
        const A* vs = v_ring[(k + j) % K];
        partial[m % 32] = gs[0] * vs[0] + gs[1] * vs[1] + gs[2] * vs[2] + gs[3] * vs[3];
        if (m % 32 == 31) {  // values m - 31 .. m: lane l ends with 2 (l % 16) and 2 (l % 16) + 1 of them
          reduce_scatter<16, 8>(partial, lane);
          A2 sums;
          sums.x = partial[0], sums.y = partial[1];
          *reinterpret_cast<A2*>(run_grad_taps + m - 31 + 2 * (lane & 15)) = sums;
        }
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int round = 0; round < kSpanTile / 32; ++round) {  // d(logits) of token t0 + k, one per lane
    const int k = round * 32 + lane, t = at.t0 + k;
    if (t < seq_len) {
      A w[KP], dw[K], dot = 0;
      load_taps(own + k * KP, w);
      const uint32_t inside = Packed ? acc_as_mask(w[K]) : ~0u;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        dw[j] = !Packed || tap_inside<K>(inside, j) ? grad_taps[k * K + j] : A(0);
        dot += w[j] * dw[j];
      }
      T* out = grad_logits + (static_cast<int64_t>(at.batch) * seq_len + t) * (heads * K) + at.head * K;
#pragma unroll
      for (int j = 0; j < K; ++j) out[j] = from_acc<T>(w[j] * (dw[j] - dot));
    }
  }
}

#if defined(__CUDACC__)
namespace {

template <typename T>
using Acc = typename AccType<T>::type;

// The values' rows (the fused projection's slice, uncopied) and the output's or gradient's: batch and row strides.
struct Strides {
  int64_t batch, row;
};

template <typename T, bool Vector, bool Packed>
void forward_tiled(const SpanConvPlan& plan, const void* values, const void* logits, void* out, int64_t seq_len,
                   int64_t heads, int64_t head_size, Strides values_rows, Strides out_rows, const int32_t* offsets,
                   int64_t sequences, cudaStream_t stream) {
  span_conv_forward_tiled_kernel<T, 9, Vector, Packed><<<plan.blocks, plan.threads, 0, stream>>>(
      static_cast<const T*>(values), static_cast<const T*>(logits), static_cast<T*>(out),
      static_cast<int>(plan.tasks), static_cast<int>(plan.tiles), static_cast<int>(seq_len), static_cast<int>(heads),
      static_cast<int>(head_size), values_rows.batch, static_cast<int>(values_rows.row), out_rows.batch,
      static_cast<int>(out_rows.row), offsets, static_cast<int>(sequences));
}

template <typename T, bool Vector, bool Packed>
void backward_tiled(const SpanConvPlan& plan, const void* grad_out, const void* values, const void* logits,
                    void* grad_values, void* grad_logits, int64_t seq_len, int64_t heads, int64_t head_size,
                    Strides values_rows, Strides grad_rows, const int32_t* offsets, int64_t sequences,
                    cudaStream_t stream) {
  span_conv_backward_tiled_kernel<T, 9, Vector, Packed><<<plan.blocks, plan.threads, 0, stream>>>(
      static_cast<const T*>(grad_out), static_cast<const T*>(values), static_cast<const T*>(logits),
      static_cast<T*>(grad_values), static_cast<T*>(grad_logits), static_cast<int>(plan.tasks),
      static_cast<int>(plan.tiles), static_cast<int>(seq_len), static_cast<int>(heads), static_cast<int>(head_size),
      values_rows.batch, static_cast<int>(values_rows.row), grad_rows.batch, static_cast<int>(grad_rows.row), offsets,
      static_cast<int>(sequences));
}

template <typename T>
void forward(const SpanConvPlan& plan, const void* values, const void* logits, void* out, int64_t batch,
             int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size, Strides values_rows,
             Strides out_rows, const int32_t* offsets, int64_t sequences, cudaStream_t stream) {
  if (plan.tiled) {
    const bool aligned = span_forward_vectors(sizeof(T), values, out, head_size, values_rows.batch, values_rows.row,
                                              out_rows.batch, out_rows.row);
    CONVBERT_FAST_WITH_PACKED(offsets, Packed,
      if (aligned) {
        forward_tiled<T, true, Packed>(plan, values, logits, out, seq_len, heads, head_size, values_rows, out_rows,
                                       offsets, sequences, stream);
      } else {
        forward_tiled<T, false, Packed>(plan, values, logits, out, seq_len, heads, head_size, values_rows, out_rows,
                                        offsets, sequences, stream);
      })
    return;
  }
  CONVBERT_FAST_WITH_PACKED(offsets, Packed, CONVBERT_FAST_WITH_KERNEL_SIZE(kernel_size, KS,
      span_conv_forward_kernel<T, KS, Packed><<<plan.blocks, plan.threads, 0, stream>>>(
          static_cast<const T*>(values), static_cast<const T*>(logits), static_cast<T*>(out), batch, seq_len,
          static_cast<int>(heads), static_cast<int>(head_size), static_cast<int>(kernel_size), values_rows.batch,
          values_rows.row, out_rows.batch, out_rows.row, offsets, static_cast<int>(sequences))))
}

template <typename T>
void backward(const SpanConvPlan& plan, const void* grad_out, const void* values, const void* logits,
              void* grad_values, void* grad_logits, void* weights, int64_t batch, int64_t seq_len, int64_t heads,
              int64_t head_size, int64_t kernel_size, Strides values_rows, Strides grad_rows, const int32_t* offsets,
              int64_t sequences, cudaStream_t stream) {
  if (plan.tiled) {
    const bool aligned = span_backward_vectors(sizeof(T), grad_out, values, grad_values, head_size, values_rows.batch,
                                               values_rows.row, grad_rows.batch, grad_rows.row);
    CONVBERT_FAST_WITH_PACKED(offsets, Packed,
      if (aligned) {
        backward_tiled<T, true, Packed>(plan, grad_out, values, logits, grad_values, grad_logits, seq_len, heads,
                                        head_size, values_rows, grad_rows, offsets, sequences, stream);
      } else {
        backward_tiled<T, false, Packed>(plan, grad_out, values, logits, grad_values, grad_logits, seq_len, heads,
                                         head_size, values_rows, grad_rows, offsets, sequences, stream);
      })
    return;
  }
  CONVBERT_FAST_WITH_PACKED(offsets, Packed, CONVBERT_FAST_WITH_KERNEL_SIZE(kernel_size, KS,
      span_conv_backward_logits_kernel<T, KS, Packed><<<plan.blocks, plan.threads, 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(values), static_cast<const T*>(logits),
          static_cast<T*>(grad_logits), static_cast<Acc<T>*>(weights), batch, seq_len, static_cast<int>(heads),
          static_cast<int>(head_size), static_cast<int>(kernel_size), values_rows.batch, values_rows.row, offsets,
          static_cast<int>(sequences));
      span_conv_backward_values_kernel<T, KS, Packed><<<plan.blocks, plan.threads, 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const Acc<T>*>(weights), static_cast<T*>(grad_values), batch,
          seq_len, static_cast<int>(heads), static_cast<int>(head_size), static_cast<int>(kernel_size), offsets,
          static_cast<int>(sequences))))
}

}  // namespace

cudaError_t span_conv_forward(KernelChoice kernels, DType dtype, const void* values, const void* logits, void* out,
                              int64_t batch, int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size,
                              int64_t values_batch_stride, int64_t values_row_stride, int64_t out_batch_stride,
                              int64_t out_row_stride, const int32_t* offsets, int64_t sequences, cudaStream_t stream) {
  if (kernel_size < 1 || kernel_size > kMaxCudaKernelSize) return cudaErrorInvalidValue;
  if (!packed_sequences_valid(batch, seq_len, offsets, sequences)) return cudaErrorInvalidValue;
  if (batch * seq_len * heads * head_size == 0) return cudaSuccess;
  const SpanConvPlan plan = span_conv_plan(kernels, dtype, batch, seq_len, heads, head_size, kernel_size,
                                           std::max(values_row_stride, out_row_stride), false);
  if (plan.blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // grid.x
  CONVBERT_FAST_DISPATCH(dtype, forward, plan, values, logits, out, batch, seq_len, heads, head_size, kernel_size,
                         Strides{values_batch_stride, values_row_stride}, Strides{out_batch_stride, out_row_stride},
                         offsets, sequences, stream)
  return cudaGetLastError();
}

cudaError_t span_conv_backward(KernelChoice kernels, DType dtype, const void* grad_out, const void* values,
                               const void* logits, void* grad_values, void* grad_logits, void* weights, int64_t batch,
                               int64_t seq_len, int64_t heads, int64_t head_size, int64_t kernel_size,
                               int64_t values_batch_stride, int64_t values_row_stride, int64_t grad_batch_stride,
                               int64_t grad_row_stride, const int32_t* offsets, int64_t sequences,
                               cudaStream_t stream) {
  if (kernel_size < 1 || kernel_size > kMaxCudaKernelSize) return cudaErrorInvalidValue;
  if (!packed_sequences_valid(batch, seq_len, offsets, sequences)) return cudaErrorInvalidValue;
  if (batch * seq_len * heads == 0) return cudaSuccess;
  const SpanConvPlan plan = span_conv_plan(kernels, dtype, batch, seq_len, heads, head_size, kernel_size,
                                           std::max(values_row_stride, grad_row_stride), true);
  if (plan.blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // grid.x
  CONVBERT_FAST_DISPATCH(dtype, backward, plan, grad_out, values, logits, grad_values, grad_logits, weights, batch,
                         seq_len, heads, head_size, kernel_size, Strides{values_batch_stride, values_row_stride},
                         Strides{grad_batch_stride, grad_row_stride}, offsets, sequences, stream)
  return cudaGetLastError();
}
#endif  // __CUDACC__

}  // namespace convbert_fast
