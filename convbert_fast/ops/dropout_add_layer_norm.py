"""dropout_add_layer_norm: LayerNorm(dropout(x) + residual), the end of every ConvBERT sublayer (the dense layer's
bias rides in its GEMM), as one pass over each row in the C++ extension (CPU and CUDA), forward and backward.

Dropout's mask is a hash of (seed, element index): the backward regenerates it instead of keeping a mask, and
the seed is drawn in the graph by the generator of the input's device, on that device: `torch.manual_seed`
reproduces a run, activation checkpointing (which restores those generators) replays the same mask, and on CUDA the
seed never leaves the GPU (the kernels read it there), so each replay of a captured CUDA graph, or of
torch.compile(mode="reduce-overhead"), draws a new one, as torch's own dropout does. The masks are not
nn.Dropout's (another random stream with the same distribution: keep with probability 1 - p, scale 1 / (1 - p)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backend, cpp
from .checks import check_float_tensors, check_shape

OP = "dropout_add_layer_norm"


def dropout_add_layer_norm_eager(x, residual, weight, bias, p, eps, training):
    """The seed's math: nn.Dropout, the residual add, nn.LayerNorm."""
    return F.layer_norm(F.dropout(x, p, training) + residual, (x.shape[-1],), weight, bias, eps)


backend.register("eager", OP, dropout_add_layer_norm_eager)


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


if cpp.LOADED:
    _forward = torch.ops.convbert_fast.dropout_add_layer_norm.default
    _backward = torch.ops.convbert_fast.dropout_add_layer_norm_backward.default

    @torch.library.register_fake("convbert_fast::dropout_add_layer_norm")
    def _(x, residual, weight, bias, p, eps, seed):
        rows = math.prod(x.shape[:-1])
        stats = x.new_empty(rows, dtype=_stat_dtype(x))
        return x.new_empty(x.shape), stats, stats.new_empty(rows)

    @torch.library.register_fake("convbert_fast::dropout_add_layer_norm_backward")
    def _(grad_out, x, residual, weight, mean, rstd, p, seed):
        return (
            x.new_empty(x.shape),
            x.new_empty(x.shape),
            weight.new_empty(weight.shape),
            weight.new_empty(weight.shape),
        )

    def _setup_context(ctx, inputs, output):
        x, residual, weight, _, ctx.p, _, seed = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, residual, weight, mean, rstd, seed)
        ctx.mark_non_differentiable(mean, rstd)

    def _backward_rule(ctx, grad_out, _grad_mean, _grad_rstd):
        x, residual, weight, mean, rstd, seed = ctx.saved_tensors
        grads = _backward(grad_out, x, residual, weight, mean, rstd, ctx.p, seed)
        return (*grads, None, None, None)

    torch.library.register_autograd(
        "convbert_fast::dropout_add_layer_norm", _backward_rule, setup_context=_setup_context
    )

    def dropout_add_layer_norm_cpp(x, residual, weight, bias, p, eps, training):
        p = p if training else 0.0
        if (
            p == 0
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, residual, weight, bias)))
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        ):
            # eager CPU inference: torch's add + layer_norm, transformers' own ops (so its numbers, bit for bit), as
            # fast here as this op's single pass with its fp64 row sums: 27 against 28 us at [128, 768]. A
            # traced graph keeps the op (export's and ONNX's translations of it; Inductor fuses either)
            return dropout_add_layer_norm_eager(x, residual, weight, bias, 0.0, eps, False)
        if torch.is_autocast_enabled(x.device.type):  # autocast runs LayerNorm in fp32: so does this op
            x, residual, weight, bias = (t.float() for t in (x, residual, weight, bias))
        # no random draw without dropout, as nn.Dropout in eval mode (then a CPU zero: read without a device sync)
        if p > 0:
            seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
        else:
            seed = torch.zeros((), dtype=torch.int64)
        return torch.ops.convbert_fast.dropout_add_layer_norm(x, residual, weight, bias, p, eps, seed)[0]

    backend.register("cpp", OP, dropout_add_layer_norm_cpp)

    @torch.library.register_fake("convbert_fast::dropout")
    def _(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _dropout_setup_context(ctx, inputs, output):
        _, ctx.p, seed = inputs
        ctx.save_for_backward(seed)

    def _dropout_backward_rule(ctx, grad_out):
        (seed,) = ctx.saved_tensors  # the same mask on the gradient: regenerated, not stored
        return torch.ops.convbert_fast.dropout(grad_out, ctx.p, seed), None, None

    torch.library.register_autograd(
        "convbert_fast::dropout", _dropout_backward_rule, setup_context=_dropout_setup_context
    )


def dropout_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    p: float = 0.0,
    eps: float = 1e-12,
    training: bool = False,
) -> torch.Tensor:
    """LayerNorm(dropout(x) + residual) over the last dimension: x, residual [..., C]; weight, bias [C].

    Under the `eager` backend, or where the C++ extension cannot run, nn.Dropout + add + nn.LayerNorm (the
    `triton` backend has no kernel of its own: this op runs there as under `auto`)."""
    check_float_tensors(OP, x=x, residual=residual, weight=weight, bias=bias)
    channels = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or channels < 1:
        raise ValueError(f"{OP}: `x` must have a non-empty last dimension, got shape {list(x.shape)}")
    check_shape(OP, "residual", residual, tuple(x.shape), str(list(x.shape)))
    check_shape(OP, "weight", weight, (channels,), f"[{channels}]")
    check_shape(OP, "bias", bias, (channels,), f"[{channels}]")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{OP}: dropout probability `p` must be in [0, 1], got {p}")
    return backend.implementation(OP, x.device)(x, residual, weight, bias, p, eps, training)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = False) -> torch.Tensor:
    """F.dropout(x, p, training) for the fused layers: where dropout_add_layer_norm runs on the C++ extension, one
    pass of its mask (the hash of a seed drawn from the device's generator and each element's index: keep with
    probability 1 - p, scale 1 / (1 - p), as nn.Dropout, from another random stream), whose backward regenerates the
    mask instead of keeping it. On the CPU torch's own draws a Mersenne Twister number per element: 19 ms in bf16 and
    20-29 ms in fp32 for one layer's attention probabilities (ConvBERT-base, B=8, L=256, 2 threads of an AMD EPYC),
    against 0.8 and 1.3 ms. Elsewhere (`eager`, or no extension) F.dropout itself."""
    check_float_tensors("dropout", x=x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: probability `p` must be in [0, 1], got {p}")
    if not training or p == 0 or not cpp.LOADED:
        return F.dropout(x, p, training)
    if backend.implementation(OP, x.device) is not dropout_add_layer_norm_cpp:  # eager, or no kernel for the device
        return F.dropout(x, p, training)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)  # in the graph, as the sibling's
    return torch.ops.convbert_fast.dropout(x, p, seed)
