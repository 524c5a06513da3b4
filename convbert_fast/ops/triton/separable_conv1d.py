"""separable_conv1d in Triton: the depthwise conv is computed tile by tile straight from [B, L, C] and fed to
the pointwise GEMM in registers (the [B, L, C] intermediate never reaches memory), with the bias and an
optional elementwise multiplier (ConvBERT multiplies the result by the query) fused into the epilogue.
The backward uses a depthwise kernel (also for d(x), with the taps reversed), a deterministic tap-gradient
kernel and two GEMMs. Packed sequences (cu_seqlens, one row [1, T, C]): the same kernels, compiled with PACKED,
find each row's sequence themselves (ops/triton/__init__.py: sequence_window) and take only the taps inside it;
a tap connects two rows of one sequence both ways, so d(x) is still the reversed conv."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import INTERPRET, MAX_UNROLL, dot_family, numerics, packing, tap_inside, tuning_configs, window


def _config(m, n, k, warps):
    # one stage: the K depthwise loads of each step would otherwise each be buffered num_stages times in shared
    # memory (K x stages x BLOCK_M x BLOCK_K x element size: 346 KB for fp32 128x128x32 with K = 9 and 3 stages)
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=1)


# Tile configs per dot family (see numerics.dot_family); tools/triton_aot_check.py checks that each fits the
# A100's and H100's shared memory and registers.
_CONFIGS = {
    # 128x128x32: 44 B spilled on sm_80 (triton 3.6)
    "16bit": [_config(128, 128, 16, 8), _config(64, 128, 32, 8), _config(64, 64, 32, 4)],
    # the depthwise tile is computed in registers from K loads of it: 4-byte tiles take a shorter BLOCK_K
    "tf32": [_config(128, 128, 16, 8), _config(64, 128, 16, 8), _config(64, 64, 16, 4)],
    # FMA dots hold their operands' rows and columns over all of BLOCK_K in registers: a short BLOCK_K
    "ieee": [_config(128, 64, 16, 8), _config(64, 64, 16, 8)],  # 16: the least tl.dot takes on triton 3.6
    "fp64": [_config(64, 32, 16, 4), _config(32, 32, 16, 4)],
}


@triton.jit
def _depthwise_tile(
    x_ptr, taps_ptr, rows, t, lo, hi, total_rows, channels, cols, kernel_size, K: tl.constexpr, ACC: tl.constexpr,
    UNROLL: tl.constexpr, PACKED: tl.constexpr
):
    """sum_j taps[j, c] * x[row + j - K/2, c] for a [rows, cols] tile, zero outside each sequence ((t, lo, hi):
    ops/triton window()'s). kernel_size is K as a runtime value: the loop's trip count when it is not unrolled."""
    col_ok = cols < channels
    acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=ACC)
    if UNROLL and K <= MAX_UNROLL:
        for j in tl.static_range(K):
            acc = _depthwise_tap(
                acc, x_ptr, taps_ptr, rows, t, lo, hi, total_rows, channels, cols, col_ok, j, K, ACC, PACKED
            )
    else:
        for j in range(0, kernel_size):
            acc = _depthwise_tap(
                acc, x_ptr, taps_ptr, rows, t, lo, hi, total_rows, channels, cols, col_ok, j, K, ACC, PACKED
            )
    return acc


@triton.jit
def _depthwise_tap(acc, x_ptr, taps_ptr, rows, t, lo, hi, total_rows, channels, cols, col_ok, j, K, ACC, PACKED):
    ok = (tap_inside(t, lo, hi, j - (K - 1) // 2, K, PACKED) & (rows < total_rows))[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + (rows + j - (K - 1) // 2)[:, None] * channels + cols[None, :], mask=ok, other=0.0)
    tap = tl.load(taps_ptr + j * channels + cols, mask=col_ok, other=0.0)
    return acc + tap.to(ACC)[None, :] * x.to(ACC)


@triton.jit
def _separable_fwd_kernel(
    x_ptr,
    taps_ptr,
    pointwise_ptr,
    bias_ptr,
    multiplier_ptr,
    out_ptr,
    total_rows,
    seq_len,
    channels,
    out_channels,
    kernel_size,
    cu_seqlens_ptr,
    num_seqs,
    K: tl.constexpr,
    HAS_MULTIPLIER: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    PACKED: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x [rows, C], taps [K, C], pointwise [A, C], bias [A], multiplier and out [rows, A], all contiguous.
    PACKED: one row of sequences split by cu_seqlens [num_seqs + 1]."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets: rows x C may pass 2^31
    t, lo, hi = window(cu_seqlens_ptr, num_seqs, rows, rows % seq_len, seq_len, total_rows, K, SEARCH_STEPS, PACKED)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for c0 in range(0, channels, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        # a loop over the taps even for small K: the K loads of an unrolled tile, in registers beside the dot's
        # accumulator, spilled (up to 72 B at K = 9 on sm_80)
        mixed = _depthwise_tile(
            x_ptr, taps_ptr, rows, t, lo, hi, total_rows, channels, cols, kernel_size, K, ACC, False, PACKED
        )
        pointwise = tl.load(
            pointwise_ptr + outs[None, :] * channels + cols[:, None],
            mask=(cols < channels)[:, None] & (outs < out_channels)[None, :],
            other=0.0,
        )
        # as the eager path: the depthwise result is rounded to the input dtype before the GEMM
        mixed = mixed.to(pointwise.dtype)
        if UPCAST_DOT:  # see numerics()
            mixed, pointwise = mixed.to(tl.float32), pointwise.to(tl.float32)
        acc += tl.dot(mixed, pointwise, input_precision=DOT_PRECISION, out_dtype=ACC)
    acc += tl.load(bias_ptr + outs, mask=outs < out_channels, other=0.0).to(ACC)[None, :]
    out_offsets = rows[:, None] * out_channels + outs[None, :]
    out_mask = (rows < total_rows)[:, None] & (outs < out_channels)[None, :]
    if HAS_MULTIPLIER:
        acc *= tl.load(multiplier_ptr + out_offsets, mask=out_mask, other=0.0).to(ACC)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# one autotuner per dot family: its own configs and its own record of the best one
_TUNED = {
    family: triton.autotune(
        configs=tuning_configs(configs), key=["channels", "out_channels", "HAS_MULTIPLIER", "PACKED"]
    )(_separable_fwd_kernel)
    for family, configs in _CONFIGS.items()
}


@triton.jit
def _depthwise_kernel(
    x_ptr,
    taps_ptr,
    out_ptr,
    total_rows,
    seq_len,
    channels,
    kernel_size,
    cu_seqlens_ptr,
    num_seqs,
    K: tl.constexpr,
    ACC: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The depthwise conv alone (the backward's recomputation and d(x)): x [rows, C] and taps [K, C] -> out
    [rows, C], all contiguous; one [BLOCK_M, BLOCK_C] tile per program, grid (cdiv(rows, BLOCK_M),
    cdiv(C, BLOCK_C))."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t, lo, hi = window(cu_seqlens_ptr, num_seqs, rows, rows % seq_len, seq_len, total_rows, K, SEARCH_STEPS, PACKED)
    acc = _depthwise_tile(
        x_ptr, taps_ptr, rows, t, lo, hi, total_rows, channels, cols, kernel_size, K, ACC, True, PACKED
    )
    mask = (rows < total_rows)[:, None] & (cols < channels)[None, :]
    tl.store(out_ptr + rows[:, None] * channels + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tap_grad_kernel(
    grad_ptr,
    x_ptr,
    partials_ptr,
    total_rows,
    seq_len,
    channels,
    kernel_size,
    cu_seqlens_ptr,
    num_seqs,
    K: tl.constexpr,
    ACC: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """partials[chunk, j, c] = sum over the chunk's rows of grad[row, c] * x[row + j - K/2, c] (no atomics: the
    chunks are added afterwards in a fixed order)."""
    chunk = tl.program_id(0).to(tl.int64)
    rows = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    grad = tl.load(
        grad_ptr + rows[:, None] * channels + cols[None, :],
        mask=(rows < total_rows)[:, None] & col_ok[None, :],
        other=0.0,
    ).to(ACC)
    t, lo, hi = window(cu_seqlens_ptr, num_seqs, rows, rows % seq_len, seq_len, total_rows, K, SEARCH_STEPS, PACKED)
    if K <= MAX_UNROLL:
        for j in tl.static_range(K):
            _tap_grad_tap(
                grad, x_ptr, partials_ptr, chunk, rows, t, lo, hi, total_rows, channels, cols, col_ok, j, K, ACC, PACKED
            )
    else:
        for j in range(0, kernel_size):
            _tap_grad_tap(
                grad, x_ptr, partials_ptr, chunk, rows, t, lo, hi, total_rows, channels, cols, col_ok, j, K, ACC, PACKED
            )


@triton.jit
def _tap_grad_tap(
    grad, x_ptr, partials_ptr, chunk, rows, t, lo, hi, total_rows, channels, cols, col_ok, j, K, ACC, PACKED
):
    ok = (tap_inside(t, lo, hi, j - (K - 1) // 2, K, PACKED) & (rows < total_rows))[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + (rows + j - (K - 1) // 2)[:, None] * channels + cols[None, :], mask=ok, other=0.0)
    tl.store(partials_ptr + (chunk * K + j) * channels + cols, tl.sum(grad * x.to(ACC), axis=0), mask=col_ok)


_BLOCK_M, _BLOCK_C = (16, 16) if INTERPRET else (32, 128)
# 8 warps: 16 values of a [32, 128] tile per thread, times the K loads in flight (with 4, 255 registers at K = 9)
_WARPS = 8


def _depthwise(x2d, taps, seq_len, cu_seqlens):
    out = torch.empty_like(x2d)
    rows, channels = x2d.shape
    if out.numel():
        grid = (triton.cdiv(rows, _BLOCK_M), triton.cdiv(channels, _BLOCK_C))
        wrap_triton(_depthwise_kernel)[grid](
            x2d,
            taps,
            out,
            rows,
            seq_len,
            channels,
            taps.shape[0],
            K=taps.shape[0],
            ACC=numerics(x2d.dtype)["ACC"],
            **packing(cu_seqlens, x2d),
            BLOCK_M=_BLOCK_M,
            BLOCK_C=_BLOCK_C,
            num_warps=_WARPS,
        )
    return out


def _tap_grad(grad2d, x2d, seq_len, kernel_size, cu_seqlens):
    rows, channels = x2d.shape
    chunks = triton.cdiv(rows, _BLOCK_M)
    acc_dtype = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    partials = torch.zeros(chunks, kernel_size, channels, dtype=acc_dtype, device=x2d.device)
    if x2d.numel():
        grid = (chunks, triton.cdiv(channels, _BLOCK_C))
        wrap_triton(_tap_grad_kernel)[grid](
            grad2d,
            x2d,
            partials,
            rows,
            seq_len,
            channels,
            kernel_size,
            K=kernel_size,
            ACC=numerics(x2d.dtype)["ACC"],
            **packing(cu_seqlens, x2d),
            BLOCK_M=_BLOCK_M,
            BLOCK_C=_BLOCK_C,
            num_warps=_WARPS,
        )
    return partials.sum(0).to(x2d.dtype)  # [K, C], a fixed-order reduction


def _taps(depthwise_weight):  # [C, 1, K] -> [K, C]
    return depthwise_weight[:, 0, :].t().contiguous()


def _run(x, depthwise_weight, pointwise_weight, bias, multiplier, cu_seqlens):
    batch, seq_len, channels = x.shape
    out_channels = pointwise_weight.shape[0]
    x2d = x.reshape(batch * seq_len, channels).contiguous()
    out = x2d.new_empty(batch * seq_len, out_channels)
    if out.numel():
        dtype = x.dtype

        def grid(meta):
            return (triton.cdiv(batch * seq_len, meta["BLOCK_M"]), triton.cdiv(out_channels, meta["BLOCK_N"]))

        wrap_triton(_TUNED[dot_family(dtype)])[grid](
            x2d,
            _taps(depthwise_weight),
            pointwise_weight.reshape(out_channels, channels).contiguous(),
            bias.reshape(out_channels).contiguous(),
            multiplier.reshape(batch * seq_len, out_channels).contiguous() if multiplier is not None else out,
            out,
            batch * seq_len,
            seq_len,
            channels,
            out_channels,
            depthwise_weight.shape[-1],
            K=depthwise_weight.shape[-1],
            HAS_MULTIPLIER=multiplier is not None,
            **packing(cu_seqlens, out),
            **numerics(dtype),
        )
    return out.view(batch, seq_len, out_channels)


@triton_op("convbert_fast_triton::separable_conv1d", mutates_args=())
def separable_conv1d_triton_op(
    x: torch.Tensor,
    depthwise_weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    bias: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    return _run(x, depthwise_weight, pointwise_weight, bias, None, cu_seqlens)


@triton_op("convbert_fast_triton::separable_conv1d_mul", mutates_args=())
def separable_conv1d_mul_triton_op(
    x: torch.Tensor,
    depthwise_weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    bias: torch.Tensor,
    multiplier: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    return _run(x, depthwise_weight, pointwise_weight, bias, multiplier, cu_seqlens)


@triton_op("convbert_fast_triton::separable_conv1d_backward", mutates_args=())
def separable_conv1d_backward_triton_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    depthwise_weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    bias: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq_len, channels = x.shape
    out_channels, kernel_size = pointwise_weight.shape[0], depthwise_weight.shape[-1]
    x2d = x.reshape(batch * seq_len, channels).contiguous()
    grad = grad_out.reshape(batch * seq_len, out_channels).contiguous()
    pointwise = pointwise_weight.reshape(out_channels, channels)
    taps = _taps(depthwise_weight)
    mixed = _depthwise(x2d, taps, seq_len, cu_seqlens)  # recomputed rather than kept from the forward pass
    grad_pointwise = (grad.t() @ mixed).view_as(pointwise_weight)
    grad_mixed = (grad @ pointwise).contiguous()
    # d(x)[s] = sum_j w[j] grad_mixed[s - j + K/2]: the same conv with the taps reversed
    grad_x = _depthwise(grad_mixed, taps.flip(0).contiguous(), seq_len, cu_seqlens).view_as(x)
    grad_taps = _tap_grad(grad_mixed, x2d, seq_len, kernel_size, cu_seqlens)
    return grad_x, grad_taps.t().contiguous().view_as(depthwise_weight), grad_pointwise, grad.sum(0).view_as(bias)


# The fused multiply's own rules (ops/separable_conv1d.py registers those of the two ops above)
@separable_conv1d_mul_triton_op.register_fake
def _(x, depthwise_weight, pointwise_weight, bias, multiplier, cu_seqlens=None):
    return x.new_empty(x.shape[0], x.shape[1], pointwise_weight.shape[0])


def _setup_context_mul(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_mul(ctx, grad_out):
    x, depthwise_weight, pointwise_weight, bias, multiplier, cu_seqlens = ctx.saved_tensors
    # the conv recomputed: one fused pass
    conv = separable_conv1d_triton_op(x, depthwise_weight, pointwise_weight, bias, cu_seqlens)
    grads = separable_conv1d_backward_triton_op(
        grad_out * multiplier, x, depthwise_weight, pointwise_weight, bias, cu_seqlens
    )
    return (*grads, grad_out * conv, None)


separable_conv1d_mul_triton_op.register_autograd(_backward_mul, setup_context=_setup_context_mul)

