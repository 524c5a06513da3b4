// What the CUDA launchers decide on the host: which kernels run for a shape and kernel choice, their grids, and the
// workspaces the glue allocates for them. Plain C++ (no CUDA, no torch): nvcc compiles it into the launchers, and g++
// into the emulation (tests/emulation/tiled_kernels.cpp), which launches its emulated kernels from these same plans
// and checks that the workspaces sized here are exactly what those kernels write.
#pragma once
#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

namespace convbert_fast {

// Which kernels run: v2, the tiled kernels where they apply and pay (below) and the general (v1) ones elsewhere;
// v1, the general ones everywhere (both stay until a GPU has run them side by side, issue 17); kTiled, the tiled
// ones wherever they apply whatever the size (CONVBERT_FAST_CUDA_KERNELS=tiled: the emulation and the GPU pass's
// tests, which run them at small sizes). The glue reads the choice once per op (ops_cuda.cpp: kernel_choice) and passes it to every plan and
// launcher of that op, so that what it allocates and what the kernels write always come from the same choice.
enum class KernelChoice { kV1, kV2, kTiled };

// Where v2 takes the tiled kernels by size: from these many tokens (rows) on, tools/kernel_cost.py's model has them
// faster than the general ones on an H100 and an H200 (its choice check fails CI otherwise). Below, a tiled kernel's
// few warps each walk a long tile with a few loads in flight and wait on the memory's latency, while the general
// kernels spread the same work over a warp or a block per token: at B=1, L=128 the span conv's forward takes
// 0.5 us against 6.3, LayerNorm's 1.2 against 3.1 (H100). The span conv's backward and the depthwise weight
// gradient are tiled at any size: their general kernels lose everywhere.
constexpr int64_t kSpanForwardTiledTokens = 2048;
constexpr int64_t kDepthwiseForwardTiledTokens = 256;
constexpr int64_t norm_tiled_rows(bool four_or_eight_byte, bool backward) {
  return (four_or_eight_byte ? 512 : 1024) * (backward ? 2 : 1);
}
constexpr bool tiled_by_size(KernelChoice kernels, int64_t size, int64_t threshold) {
  return kernels == KernelChoice::kTiled || (kernels == KernelChoice::kV2 && size >= threshold);
}

enum class DType { Float32, Float64, Float16, BFloat16 };

constexpr int64_t element_size(DType dtype) { return dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2; }
// the accumulation type's size: fp64 for fp64, else fp32
constexpr int64_t acc_size(DType dtype) { return dtype == DType::Float64 ? 8 : 4; }
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// ---- the span conv (dynamic_span_conv.cu)
constexpr int kSpanWarpsPerBlock = 4;  // v1: a warp per (token, head)
constexpr int kSpanTile = 64;          // v2: tokens per warp
constexpr int kSpanRun = 32;           // v2: tokens per half-warp
// v2: warps per block, 4, or 2 in fp64 (a block's shared memory is 48 KB)
constexpr int span_tile_warps(int64_t acc_bytes) { return acc_bytes == 8 ? 2 : 4; }

struct SpanConvPlan {
  bool tiled;              // v2
  int64_t blocks, threads;  // the grid of the forward kernel and of each backward one
  int64_t tasks, tiles;    // v2: one warp per (batch, head, tile); v1: one per (token, head)
};

// row_stride: the widest row stride (in elements) of the tensors the kernels read or write with 32-bit offsets.
// The tiled kernels take K = 9, a head within a half-warp's 16 lanes of 4 channels, and 32-bit offsets inside a
// sequence (row r < L + 64 times the row stride) and task count; the forward, kSpanForwardTiledTokens tokens.
inline SpanConvPlan span_conv_plan(KernelChoice kernels, DType dtype, int64_t batch, int64_t seq_len, int64_t heads,
                                   int64_t head_size, int64_t kernel_size, int64_t row_stride, bool backward) {
  const int64_t tiles = ceil_div(seq_len, kSpanTile), tiled_tasks = batch * heads * tiles;
  const bool tiled = tiled_by_size(kernels, backward ? INT64_MAX : batch * seq_len, kSpanForwardTiledTokens) &&
                     kernel_size == 9 && head_size <= 2 * 32 && row_stride >= 0 &&
                     (seq_len + kSpanTile) * std::max(heads * head_size, row_stride) < INT_MAX &&
                     tiled_tasks < INT_MAX - 4;
  if (tiled) {
    const int warps = span_tile_warps(acc_size(dtype));
    return {true, ceil_div(tiled_tasks, warps), warps * 32, tiled_tasks, tiles};
  }
  const int64_t tasks = batch * seq_len * heads;
  return {false, ceil_div(tasks, kSpanWarpsPerBlock), kSpanWarpsPerBlock * 32, tasks, 0};
}

// The tiled kernels' vector path (4 channels a lane): the pointers they read or write in vectors aligned to 4
// elements, and every stride a multiple of 4 (values and the output, or the gradient, read through their strides).
inline bool span_forward_vectors(int64_t element_size, const void* values, const void* out, int64_t head_size,
                                 int64_t values_batch_stride, int64_t values_row_stride, int64_t out_batch_stride,
                                 int64_t out_row_stride) {
  return vectors_aligned(4, element_size, {values, out},
                         {head_size, values_batch_stride, values_row_stride, out_batch_stride, out_row_stride});
}
inline bool span_backward_vectors(int64_t element_size, const void* grad, const void* values, const void* grad_values,
                                  int64_t head_size, int64_t values_batch_stride, int64_t values_row_stride,
                                  int64_t grad_batch_stride, int64_t grad_row_stride) {
  return vectors_aligned(4, element_size, {grad, values, grad_values},
                         {head_size, values_batch_stride, values_row_stride, grad_batch_stride, grad_row_stride});
}

// ---- the depthwise conv (separable_conv1d.cu)
constexpr int kDepthwiseThreads = 256;  // v1: a thread per element (forward) or channel (weight gradient)
constexpr int kDepthwiseWarps = 4;      // v2: warps per block
constexpr int kDepthwiseTile = 32;      // v2 forward: tokens per warp
constexpr int kDepthwiseVec = 4;        // v2 forward: channels per lane
constexpr int kWeightGradChunk = 128;   // v2 weight gradient: tokens per partial sum
constexpr int kWeightGradVec = 2;       // v2 weight gradient: channels per lane (more warps in flight)

// Whether the tiled kernels take this shape: K = 9 and 32-bit offsets inside a sequence (rows < L + tile), and
// `min_tokens` tokens.
inline bool depthwise_tiled(KernelChoice kernels, int64_t batch, int64_t seq_len, int64_t channels,
                            int64_t kernel_size, int64_t tile, int64_t min_tokens) {
  return tiled_by_size(kernels, batch * seq_len, min_tokens) && kernel_size == 9 &&
         (seq_len + tile) * channels < INT_MAX &&
         batch * ceil_div(seq_len, tile) * ceil_div(channels, 32) < INT_MAX - kDepthwiseWarps;
}

struct DepthwisePlan {
  bool tiled;
  int64_t blocks, threads;
  int64_t tasks, tiles, groups;  // v2: a warp per (batch, tile of tokens, group of 32 x kDepthwiseVec channels)
};

inline DepthwisePlan depthwise_forward_plan(KernelChoice kernels, int64_t batch, int64_t seq_len, int64_t channels,
                                            int64_t kernel_size) {
  if (depthwise_tiled(kernels, batch, seq_len, channels, kernel_size, kDepthwiseTile,
                      kDepthwiseForwardTiledTokens)) {
    const int64_t tiles = ceil_div(seq_len, kDepthwiseTile), groups = ceil_div(channels, 32 * kDepthwiseVec);
    const int64_t tasks = batch * tiles * groups;
    return {true, ceil_div(tasks, kDepthwiseWarps), kDepthwiseWarps * 32, tasks, tiles, groups};
  }
  // a grid-stride loop: at most 2^30 blocks
  const int64_t blocks = std::min<int64_t>(ceil_div(batch * seq_len * channels, kDepthwiseThreads), int64_t(1) << 30);
  return {false, blocks, kDepthwiseThreads, 0, 0, 0};
}

inline bool depthwise_forward_vectors(int64_t element_size, const void* x, const void* taps, const void* out,
                                      int64_t channels) {
  return vectors_aligned(kDepthwiseVec, element_size, {x, taps, out}, {channels});
}
inline bool depthwise_weight_grad_vectors(int64_t element_size, const void* grad, const void* x, int64_t channels) {
  return vectors_aligned(kWeightGradVec, element_size, {grad, x}, {channels});
}

struct WeightGradPlan {
  bool tiled;
  int64_t chunks;                      // rows of the partial sums [chunks, K, C] (every entry written)
  int64_t chunk_rows;                  // v1: rows of [B * L] per chunk
  int64_t blocks_x, blocks_y, threads;
  int64_t tasks, row_chunks, groups;  // v2: a warp per (batch, chunk, group of 32 x kWeightGradVec channels)
};

// v1: chunks of chunk_rows consecutive rows of [B * L, C], at most 65535 (grid.y); v2: chunks of kWeightGradChunk
// tokens inside each batch row.
inline WeightGradPlan depthwise_weight_grad_plan(KernelChoice kernels, int64_t batch, int64_t seq_len,
                                                 int64_t channels, int64_t kernel_size) {
  if (depthwise_tiled(kernels, batch, seq_len, channels, kernel_size, kWeightGradChunk, 0)) {
    const int64_t chunks = ceil_div(seq_len, kWeightGradChunk), groups = ceil_div(channels, 32 * kWeightGradVec);
    const int64_t tasks = batch * chunks * groups;
    return {true, batch * chunks, 0, ceil_div(tasks, kDepthwiseWarps), 1, kDepthwiseWarps * 32, tasks, chunks, groups};
  }
  const int64_t rows = batch * seq_len, chunk_rows = std::max<int64_t>(64, ceil_div(rows, 65535));
  const int64_t chunks = ceil_div(rows, chunk_rows);
  return {false, chunks, chunk_rows, ceil_div(channels, kDepthwiseThreads), chunks, kDepthwiseThreads, 0, 0, 0};
}

// ---- dropout + residual + LayerNorm (dropout_add_layer_norm.cu)
constexpr int kNormThreads = 256;     // v1: a block per row
constexpr int kNormWarps = 4;         // v2: warps per block
constexpr int kNormForwardRows = 4;   // v2: rows per warp
constexpr int kNormBackwardRows = 8;  // v2: rows per warp: a block's partial sums cover 32 rows

constexpr int norm_vec(DType dtype) { return static_cast<int>(16 / element_size(dtype)); }  // elements per vector

struct NormPlan {
  int vectors;                               // v2: 16-byte vectors per lane; 0: v1
  int64_t forward_blocks, backward_blocks;
  int64_t weight_rows, bias_rows;           // the backward's partial sums [rows, C] of d(weight) and d(bias)
};

// The tiled kernels hold a row in registers, up to 32 elements per lane: 4 vectors in fp16/bf16 (C <= 1024), 8 in
// fp32 (C <= 1024: ConvBERT-base under autocast, whose LayerNorm runs in fp32), 4 in fp64 (C <= 256; more would not
// fit); instantiated for 1 to 4 vectors, and 6 and 8 in fp32 (5 and 7 round up: the extra vectors are masked). For C
// a whole number of vectors and every pointer aligned (`aligned`: vectors_aligned over them with norm_vec). v1
// writes grad * xhat per row (weight_rows = rows) and no bias partials; v2 one row of each per block of 32 rows.
// v2 takes them from norm_tiled_rows rows on.
constexpr int norm_max_vectors(DType dtype) { return dtype == DType::Float32 ? 8 : 4; }
inline NormPlan norm_plan(KernelChoice kernels, DType dtype, int64_t rows, int64_t channels, bool aligned,
                          bool backward) {
  const int vec = norm_vec(dtype);
  int64_t needed = ceil_div(channels, 32 * vec);
  if (needed == 5 || needed == 7) ++needed;
  const int64_t threshold = norm_tiled_rows(element_size(dtype) >= 4, backward);
  if (tiled_by_size(kernels, rows, threshold) && aligned && channels % vec == 0 &&
      needed <= norm_max_vectors(dtype)) {
    const int64_t backward_blocks = ceil_div(rows, kNormWarps * kNormBackwardRows);
    return {static_cast<int>(needed), ceil_div(rows, kNormWarps * kNormForwardRows), backward_blocks,
            backward_blocks, backward_blocks};
  }
  return {0, rows, rows, rows, 0};
}
inline NormPlan norm_forward_plan(KernelChoice kernels, DType dtype, const void* x, const void* residual,
                                  const void* weight, const void* bias, const void* out, int64_t rows,
                                  int64_t channels) {
  const bool aligned = vectors_aligned(norm_vec(dtype), element_size(dtype), {x, residual, weight, bias, out},
                                       {channels});
  return norm_plan(kernels, dtype, rows, channels, aligned, false);
}
inline NormPlan norm_backward_plan(KernelChoice kernels, DType dtype, const void* grad, const void* x,
                                   const void* residual, const void* weight, const void* grad_x,
                                   const void* grad_residual, int64_t rows, int64_t channels) {
  const bool aligned = vectors_aligned(norm_vec(dtype), element_size(dtype),
                                       {grad, x, residual, weight, grad_x, grad_residual}, {channels});
  return norm_plan(kernels, dtype, rows, channels, aligned, true);
}

}  // namespace convbert_fast
