"""grouped_linear in Triton: one grouped GEMM kernel on the original layout (a program per output tile of one
group; groups are strided views, never permuted copies), with the bias and an optional GELU fused into its
epilogue. The same kernel, with other strides, computes d(x) and d(weight) in the backward."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import dot_family, numerics, tuning_configs


def _config(m, n, k, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


# Tile configs per dot family (see numerics.dot_family), each fitting the A100's 163 KB of shared memory per block
# (stages x (BLOCK_M + BLOCK_N) x BLOCK_K x element size) and its registers without spilling
# (tools/triton_aot_check.py checks both on sm_80 and sm_90).
_CONFIGS = {
    # tensor cores, 2-byte tiles: 128-wide tiles with 3-4 stages (at most 96 KB), smaller ones for small groups
    "16bit": [
        _config(128, 128, 64, 8, 3),
        _config(64, 128, 32, 4, 4),  # BLOCK_K 64: 8 B spilled on sm_80 (triton 3.6)
        _config(64, 64, 32, 4, 4),
        _config(32, 64, 32, 2, 5),
    ],
    # tensor cores, 4-byte tiles: BLOCK_K 32 keeps the 16-bit configs' shared memory
    "tf32": [_config(128, 128, 32, 8, 3), _config(64, 128, 32, 4, 4), _config(64, 64, 32, 4, 4)],
    # FMA dots: each thread holds its rows of A and columns of B over all of BLOCK_K in registers, so a short
    # BLOCK_K: 16, the least tl.dot takes on triton 3.6 (with BLOCK_K 32, 9.8 KB spilled on sm_80)
    # 64x64x16 w4 spilled 8 B on sm_80 (triton 3.6), 128x64x16 w8 16 B on sm_90 (triton 3.9)
    "ieee": [_config(64, 64, 16, 8, 3), _config(32, 64, 16, 4, 3)],
    # FMA dots on 8-byte values: smaller tiles
    "fp64": [_config(64, 32, 16, 4, 2), _config(32, 32, 16, 4, 2)],
}


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # exact (erf) GELU, as nn.functional.gelu


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    pre_ptr,
    M,
    N,
    K,
    stride_ag,
    stride_am,
    stride_ak,
    stride_bg,
    stride_bk,
    stride_bn,
    stride_cg,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For group g: C_g[M, N] = A_g[M, K] @ B_g[K, N] (+ bias_g[N]) (then GELU; the pre-activation to pre_ptr,
    which shares C's strides). Every operand is addressed through its strides."""
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit offsets: rows x strides may pass 2^31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_group, b_group = a_ptr + g * stride_ag, b_ptr + g * stride_bg
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        a = tl.load(
            a_group + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        b = tl.load(
            b_group + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=(offs_k < K)[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        if UPCAST_DOT:  # see numerics()
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(ACC)[None, :]
    c_offsets = g * stride_cg + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if GELU:
        tl.store(pre_ptr + c_offsets, acc.to(pre_ptr.dtype.element_ty), mask=c_mask)
        acc = _gelu(acc)
    tl.store(c_ptr + c_offsets, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# one autotuner per dot family: its own configs and its own record of the best one
_TUNED = {
    family: triton.autotune(configs=tuning_configs(configs), key=["M", "N", "K", "HAS_BIAS", "GELU"])(
        _grouped_gemm_kernel
    )
    for family, configs in _CONFIGS.items()
}


def _launch(a, a_strides, b, b_strides, c, c_strides, groups, M, N, K, bias=None, pre=None):
    """a_strides: (group, m, k); b_strides: (group, k, n); c_strides: (group, m, n), in elements."""
    if M == 0 or N == 0:
        return
    if K == 0:  # an empty sum: the bias alone
        c.copy_(bias.view(1, -1).expand_as(c) if bias is not None else torch.zeros_like(c))
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), groups)

    wrap_triton(_TUNED[dot_family(c.dtype)])[grid](
        a,
        b,
        c,
        bias if bias is not None else c,
        pre if pre is not None else c,
        M,
        N,
        K,
        *a_strides,
        *b_strides,
        *c_strides,
        HAS_BIAS=bias is not None,
        GELU=pre is not None,
        **numerics(c.dtype),
    )


def _forward(x, weight, bias, gelu):
    groups, group_in, group_out = weight.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), groups * group_in).contiguous()
    weight = weight.contiguous()
    rows = x2d.shape[0]
    out = x2d.new_empty(rows, groups * group_out)
    pre = torch.empty_like(out) if gelu else None
    _launch(
        x2d,
        (group_in, x2d.stride(0), 1),
        weight,
        (group_in * group_out, group_out, 1),
        out,
        (group_out, out.stride(0), 1),
        groups,
        rows,
        group_out,
        group_in,
        bias=bias.contiguous(),
        pre=pre,
    )
    shape = (*x.shape[:-1], groups * group_out)
    return out.view(shape), (pre.view(shape) if gelu else out.view(shape))


@triton_op("convbert_fast_triton::grouped_linear", mutates_args=())
def grouped_linear_triton_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _forward(x, weight, bias, gelu=False)[0]


@triton_op("convbert_fast_triton::grouped_linear_gelu", mutates_args=())
def grouped_linear_gelu_triton_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    out, pre = _forward(x, weight, bias, gelu=True)
    return out, pre


@triton_op("convbert_fast_triton::grouped_linear_backward", mutates_args=())
def grouped_linear_backward_triton_op(
    grad_pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, group_in, group_out = weight.shape
    rows = math.prod(x.shape[:-1])
    x2d = x.reshape(rows, groups * group_in).contiguous()
    grad2d = grad_pre.reshape(rows, groups * group_out).contiguous()
    weight = weight.contiguous()
    grad_x = torch.empty_like(x2d)
    grad_weight = torch.empty_like(weight)
    # d(x)_g [N, Din/G] = d(pre)_g [N, Dout/G] @ weight_g^T
    _launch(
        grad2d,
        (group_out, grad2d.stride(0), 1),
        weight,
        (group_in * group_out, 1, group_out),
        grad_x,
        (group_in, grad_x.stride(0), 1),
        groups,
        rows,
        group_in,
        group_out,
    )
    # d(weight)_g [Din/G, Dout/G] = x_g^T [Din/G, N] @ d(pre)_g [N, Dout/G]
    _launch(
        x2d,
        (group_in, 1, x2d.stride(0)),
        grad2d,
        (group_out, grad2d.stride(0), 1),
        grad_weight,
        (group_in * group_out, group_out, 1),
        groups,
        group_in,
        group_out,
        rows,
    )
    return grad_x.view(x.shape), grad_weight, grad2d.sum(0)

