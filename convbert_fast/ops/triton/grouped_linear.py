"""grouped_linear in Triton: one grouped GEMM kernel on the original layout (a program per output tile of one
group; groups are strided views, never permuted copies), with the bias and an optional GELU fused into its
epilogue. The same kernel, with other strides, computes d(x) and d(weight) in the backward."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import numerics, tuning_configs


def _configs():
    return tuning_configs(
        [  # Hopper and Ampere: 128-wide tiles with 3-4 stages, smaller ones for small groups
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=2, num_stages=5),
        ]
    )


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # exact (erf) GELU, as nn.functional.gelu


@triton.autotune(configs=_configs(), key=["M", "N", "K", "HAS_BIAS", "GELU"])
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


def _launch(a, a_strides, b, b_strides, c, c_strides, groups, M, N, K, bias=None, pre=None):
    """a_strides: (group, m, k); b_strides: (group, k, n); c_strides: (group, m, n), in elements."""
    if M == 0 or N == 0:
        return
    if K == 0:  # an empty sum: the bias alone
        c.copy_(bias.view(1, -1).expand_as(c) if bias is not None else torch.zeros_like(c))
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), groups)

    wrap_triton(_grouped_gemm_kernel)[grid](
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

