"""dynamic_span_conv in Triton: a tile of rows of one head per program, the softmax over K in registers,
fp32 accumulation; the backward fuses d(logits) (softmax backward) and d(values) (the transposed span) in one
kernel with no atomics. Packed sequences (cu_seqlens): the same kernels, compiled with PACKED, find each row's
sequence themselves (ops/triton/__init__.py: sequence_window) and take only the taps inside it."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import INTERPRET, MAX_UNROLL, numerics, packing, tap_inside, window


@triton.jit
def _softmax_rows(logits_ptr, rows, seq_len, stride_l, head_offset, taps, K: tl.constexpr, ACC: tl.constexpr):
    """Softmax over the K logits of `rows` (one head) -> [BLOCK_L, K_PAD]; padded taps and rows outside
    [0, L) get 0. As torch.softmax: subtract the max, so a NaN logit makes its whole row NaN."""
    row_ok = (rows >= 0) & (rows < seq_len)
    mask = row_ok[:, None] & (taps < K)[None, :]
    logits = tl.load(
        logits_ptr + rows[:, None] * stride_l + head_offset + taps[None, :], mask=mask, other=float("-inf")
    ).to(ACC)
    row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
    e = tl.where(mask, tl.exp(logits - row_max[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    return e / tl.where(row_ok, total, 1.0)[:, None]


@triton.jit
def _span_conv_fwd_kernel(
    values_ptr,
    logits_ptr,
    out_ptr,
    seq_len,
    head_size,
    kernel_size,
    stride_vb,
    stride_vl,
    stride_kb,
    stride_kl,
    stride_ob,
    stride_ol,
    cu_seqlens_ptr,
    num_seqs,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    PACKED: tl.constexpr,
):
    """values [B, L, H*D] and logits [B, L, H*K] with unit channel stride -> out [B, L, H*D] at its own batch and
    row strides (a slice of a wider [B, L, P + H*D] tensor for the concat). One program per (BLOCK_L rows, head,
    batch): the softmax of its rows' K logits once, then the K shifted value rows weighed, BLOCK_D channels at
    a time. PACKED: B = 1 and the taps of a row stop at its sequence's bounds (cu_seqlens [num_seqs + 1])."""
    tile, head, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # 64-bit offsets
    rows = (tile * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    position, lo, hi = window(cu_seqlens_ptr, num_seqs, rows, rows, seq_len, seq_len, K, SEARCH_STEPS, PACKED)
    taps = tl.arange(0, K_PAD)
    weights = _softmax_rows(logits_ptr + b * stride_kb, rows, seq_len, stride_kl, head * K, taps, K, ACC)
    values = values_ptr + b * stride_vb + head * head_size
    for d0 in range(0, head_size, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
        if K <= MAX_UNROLL:
            for j in tl.static_range(K):
                acc = _value_tap(
                    acc, values, weights, rows, dims, position, lo, hi, head_size, stride_vl, taps, j, K, ACC, PACKED
                )
        else:
            for j in range(0, kernel_size):
                acc = _value_tap(
                    acc, values, weights, rows, dims, position, lo, hi, head_size, stride_vl, taps, j, K, ACC, PACKED
                )
        store_ok = (rows < seq_len)[:, None] & (dims < head_size)[None, :]
        tl.store(
            out_ptr + b * stride_ob + rows[:, None] * stride_ol + head * head_size + dims[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=store_ok,
        )


@triton.jit
def _value_tap(acc, values, weights, rows, dims, position, lo, hi, head_size, stride_vl, taps, j, K, ACC, PACKED):
    """acc += weight j of each row x values at row + j - K/2."""
    source = rows + j - (K - 1) // 2
    ok = tap_inside(position, lo, hi, j - (K - 1) // 2, K, PACKED)[:, None] & (dims < head_size)[None, :]
    v = tl.load(values + source[:, None] * stride_vl + dims[None, :], mask=ok, other=0.0).to(ACC)
    w_j = tl.sum(tl.where(taps[None, :] == j, weights, 0.0), axis=1)
    return acc + w_j[:, None] * v


@triton.jit
def _span_conv_grad_logits_kernel(
    grad_ptr,
    values_ptr,
    logits_ptr,
    grad_logits_ptr,
    probs_ptr,
    seq_len,
    head_size,
    kernel_size,
    stride_lb,
    stride_ll,
    stride_kb,
    stride_kl,
    cu_seqlens_ptr,
    num_seqs,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    PACKED: tl.constexpr,
):
    """d(logits) of a tile of rows of one head: d(weight j) = grad . values at row + j - K/2, then the softmax
    backward. The softmax weights go to probs (logits' strides, ACC dtype) for _span_conv_grad_values_kernel.
    grad and values share strides (stride_lb, stride_ll); logits, grad_logits and probs (stride_kb, stride_kl)."""
    tile, head, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # 64-bit offsets
    rows = (tile * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    position, lo, hi = window(cu_seqlens_ptr, num_seqs, rows, rows, seq_len, seq_len, K, SEARCH_STEPS, PACKED)
    taps = tl.arange(0, K_PAD)
    weights = _softmax_rows(logits_ptr + b * stride_kb, rows, seq_len, stride_kl, head * K, taps, K, ACC)
    base = b * stride_lb + head * head_size
    grad_weights = tl.zeros([BLOCK_L, K_PAD], dtype=ACC)
    for d0 in range(0, head_size, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dims_ok = (dims < head_size)[None, :]
        grad_rows = tl.load(
            grad_ptr + base + rows[:, None] * stride_ll + dims[None, :],
            mask=(rows < seq_len)[:, None] & dims_ok,
            other=0.0,
        ).to(ACC)
        if K <= MAX_UNROLL:
            for j in tl.static_range(K):
                grad_weights = _grad_weight_tap(grad_weights, grad_rows, values_ptr + base, rows, dims, dims_ok,
                                                position, lo, hi, stride_ll, taps, j, K, ACC, PACKED)
        else:
            for j in range(0, kernel_size):
                grad_weights = _grad_weight_tap(grad_weights, grad_rows, values_ptr + base, rows, dims, dims_ok,
                                                position, lo, hi, stride_ll, taps, j, K, ACC, PACKED)
    # softmax backward: dlogit_j = w_j (dw_j - sum_i w_i dw_i)
    grad_logits = weights * (grad_weights - tl.sum(weights * grad_weights, axis=1)[:, None])
    offsets = b * stride_kb + rows[:, None] * stride_kl + head * K + taps[None, :]
    mask = (rows < seq_len)[:, None] & (taps < K)[None, :]
    tl.store(grad_logits_ptr + offsets, grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=mask)
    tl.store(probs_ptr + offsets, weights, mask=mask)


@triton.jit
def _grad_weight_tap(
    grad_weights, grad_rows, values, rows, dims, dims_ok, position, lo, hi, stride_ll, taps, j, K, ACC, PACKED
):
    """grad_weights[:, j] += grad . values at rows + j - K/2 (tap j of these rows read there)."""
    source = rows + j - (K - 1) // 2
    ok = tap_inside(position, lo, hi, j - (K - 1) // 2, K, PACKED)[:, None] & dims_ok
    v = tl.load(values + source[:, None] * stride_ll + dims[None, :], mask=ok, other=0.0)
    g_j = tl.sum(grad_rows * v.to(ACC), axis=1)
    return grad_weights + tl.where(taps[None, :] == j, g_j[:, None], 0.0)


@triton.jit
def _span_conv_grad_values_kernel(
    grad_ptr,
    probs_ptr,
    grad_values_ptr,
    seq_len,
    head_size,
    kernel_size,
    stride_lb,
    stride_ll,
    stride_kb,
    stride_kl,
    cu_seqlens_ptr,
    num_seqs,
    K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    PACKED: tl.constexpr,
):
    """d(values) of a tile of rows of one head: these rows were read by tap j of rows - j + K/2, so they gather
    that row's weight j (from probs) times its gradient. grad and grad_values share (stride_lb, stride_ll); probs
    has (stride_kb, stride_kl). A row's readers are in its own sequence: PACKED, the same window as the forward's."""
    tile, head, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # 64-bit offsets
    rows = (tile * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    position, lo, hi = window(cu_seqlens_ptr, num_seqs, rows, rows, seq_len, seq_len, K, SEARCH_STEPS, PACKED)
    base = b * stride_lb + head * head_size
    probs = probs_ptr + b * stride_kb + head * K
    for d0 in range(0, head_size, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dims_ok = (dims < head_size)[None, :]
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
        if K <= MAX_UNROLL:
            for j in tl.static_range(K):
                acc = _grad_value_tap(acc, grad_ptr + base, probs, rows, dims, dims_ok, position, lo, hi, stride_ll,
                                      stride_kl, j, K, ACC, PACKED)
        else:
            for j in range(0, kernel_size):
                acc = _grad_value_tap(acc, grad_ptr + base, probs, rows, dims, dims_ok, position, lo, hi, stride_ll,
                                      stride_kl, j, K, ACC, PACKED)
        tl.store(
            grad_values_ptr + base + rows[:, None] * stride_ll + dims[None, :],
            acc.to(grad_values_ptr.dtype.element_ty),
            mask=(rows < seq_len)[:, None] & dims_ok,
        )


@triton.jit
def _grad_value_tap(acc, grad, probs, rows, dims, dims_ok, position, lo, hi, stride_ll, stride_kl, j, K, ACC, PACKED):
    reader = rows - j + (K - 1) // 2
    reader_ok = tap_inside(position, lo, hi, (K - 1) // 2 - j, K, PACKED)
    w_j = tl.load(probs + reader * stride_kl + j, mask=reader_ok, other=0.0)
    g = tl.load(grad + reader[:, None] * stride_ll + dims[None, :], mask=reader_ok[:, None] & dims_ok, other=0.0)
    return acc + w_j[:, None].to(ACC) * g.to(ACC)


def _config(dtype, kernel_size, head_size):
    """Launch constants: rows per program, channels per step, K padded to a power of two, accumulator dtype."""
    return dict(
        BLOCK_L=16 if INTERPRET else 32,
        num_warps=8,  # [32, BLOCK_D] tiles times the K loads in flight: with 4 warps, 254 registers at K = 9
        BLOCK_D=min(triton.next_power_of_2(max(head_size, 16)), 128),
        K=kernel_size,
        K_PAD=triton.next_power_of_2(kernel_size),
        ACC=numerics(dtype)["ACC"],
    )


def _span_conv_forward_into(values, kernel_logits, num_heads, out, cu_seqlens):  # out [B, L, A], strided rows
    values, kernel_logits = values.contiguous(), kernel_logits.contiguous()
    batch, seq_len, width = values.shape
    head_size, kernel_size = width // num_heads, kernel_logits.shape[-1] // num_heads
    if out.numel():
        config = _config(values.dtype, kernel_size, head_size)
        wrap_triton(_span_conv_fwd_kernel)[(triton.cdiv(seq_len, config["BLOCK_L"]), num_heads, batch)](
            values,
            kernel_logits,
            out,
            seq_len,
            head_size,
            kernel_size,
            values.stride(0),
            values.stride(1),
            kernel_logits.stride(0),
            kernel_logits.stride(1),
            out.stride(0),
            out.stride(1),
            **packing(cu_seqlens, values),
            **config,
        )
    return out


@triton_op("convbert_fast_triton::dynamic_span_conv", mutates_args=())
def dynamic_span_conv_triton_op(
    values: torch.Tensor, kernel_logits: torch.Tensor, num_heads: int, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    out = torch.empty_like(values, memory_format=torch.contiguous_format)
    return _span_conv_forward_into(values, kernel_logits, num_heads, out, cu_seqlens)


@triton_op("convbert_fast_triton::dynamic_span_conv_concat", mutates_args=())
def dynamic_span_conv_concat_triton_op(
    prefix: torch.Tensor,
    values: torch.Tensor,
    kernel_logits: torch.Tensor,
    num_heads: int,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, seq_len, width = values.shape
    prefix_width = math.prod(prefix.shape[2:])
    out = values.new_empty(batch, seq_len, prefix_width + width)
    out[..., :prefix_width].view(prefix.shape).copy_(prefix)
    _span_conv_forward_into(values, kernel_logits, num_heads, out[..., prefix_width:], cu_seqlens)
    return out


@triton_op("convbert_fast_triton::dynamic_span_conv_backward", mutates_args=())
def dynamic_span_conv_backward_triton_op(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    kernel_logits: torch.Tensor,
    num_heads: int,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_out, values, kernel_logits = grad_out.contiguous(), values.contiguous(), kernel_logits.contiguous()
    batch, seq_len, width = values.shape
    head_size, kernel_size = width // num_heads, kernel_logits.shape[-1] // num_heads
    grad_values, grad_logits = torch.empty_like(values), torch.empty_like(kernel_logits)
    if values.numel():
        config = _config(values.dtype, kernel_size, head_size)
        grid = (triton.cdiv(seq_len, config["BLOCK_L"]), num_heads, batch)
        # the softmax weights, written by the first kernel and gathered by the second (instead of recomputing
        # K softmaxes per row there)
        probs = torch.empty(kernel_logits.shape, dtype=torch.float64 if values.dtype == torch.float64 else
                            torch.float32, device=values.device)
        strides = (values.stride(0), values.stride(1), kernel_logits.stride(0), kernel_logits.stride(1))
        config.update(packing(cu_seqlens, values))
        wrap_triton(_span_conv_grad_logits_kernel)[grid](
            grad_out, values, kernel_logits, grad_logits, probs, seq_len, head_size, kernel_size, *strides, **config
        )
        del config["K_PAD"]  # the second kernel reads the weights, not the logits
        wrap_triton(_span_conv_grad_values_kernel)[grid](
            grad_out, probs, grad_values, seq_len, head_size, kernel_size, *strides, **config
        )
    return grad_values, grad_logits

