"""separable_conv1d: ConvBERT's `key_conv_attn_layer` (depthwise conv over the sequence, pointwise C -> A, bias)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend, cpp, triton
from .checks import check_float_tensors, check_kernel_size, check_sequence_offsets, check_shape, sequence_bounds

OP = "separable_conv1d"
# The widest fp16 depthwise kernel oneDNN was seen to JIT on an AVX512-FP16 CPU (K = 33, 41, 49, 57 and 63 hung; 31 took 18 ms).
ONEDNN_FP16_SAFE_KERNEL_SIZE = 31


def separable_conv1d_eager(x, depthwise_weight, pointwise_weight, bias, multiplier=None, cu_seqlens=None):
    """The seed's math: transpose to [B, C, L], two nn.Conv1d convolutions, bias, transpose back (then the
    multiply by the query that ConvBERT applies to this result). Packed sequences (cu_seqlens): the same, one
    sequence at a time."""
    if cu_seqlens is not None:
        pieces = [
            separable_conv1d_eager(
                x[:, start:end],
                depthwise_weight,
                pointwise_weight,
                bias,
                None if multiplier is None else multiplier[:, start:end],
            )
            for start, end in sequence_bounds(cu_seqlens)
        ]
        return torch.cat(pieces, dim=1) if pieces else x.new_empty(*x.shape[:2], pointwise_weight.shape[0])
    kernel_size = depthwise_weight.shape[-1]
    x_t, taps = x.transpose(1, 2), depthwise_weight  # [B, C, L], [C, 1, K]
    if x.device.type == "cpu" and x.dtype == torch.float16 and kernel_size > ONEDNN_FP16_SAFE_KERNEL_SIZE:
        # On CPUs with AVX512-FP16, oneDNN's JIT for fp16 depthwise kernels wider than 31 taps never returns
        # (jit_brdgmm_kernel_base_t::generate; transformers' ConvBERT hangs the same way). fp32 and one rounding
        # back is the same math: the fp16 kernel accumulates in fp32 too.
        y = F.conv1d(x_t.float(), taps.float(), padding=kernel_size // 2, groups=x.shape[-1]).to(x.dtype)
    else:
        y = F.conv1d(x_t, taps, padding=kernel_size // 2, groups=x.shape[-1])  # [B, C, L]
    y = F.conv1d(y, pointwise_weight)  # [B, A, L]
    y = (y + bias.reshape(-1, 1)).transpose(1, 2)  # [B, L, A]
    return y if multiplier is None else torch.multiply(y, multiplier)


backend.register("eager", OP, separable_conv1d_eager)


def register_rules(forward, backward) -> None:
    """Fake-tensor and autograd rules of a backend's separable-conv op pair (cpp and triton share them)."""
    torch.library.register_fake(
        forward, lambda x, dw, pw, bias, cu_seqlens=None: x.new_empty(x.shape[0], x.shape[1], pw.shape[0])
    )
    torch.library.register_fake(
        backward, lambda grad, *inputs, cu_seqlens=None: tuple(t.new_empty(t.shape) for t in inputs[:4])
    )

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_rule(ctx, grad_out):
        return *backward(grad_out, *ctx.saved_tensors), None

    torch.library.register_autograd(forward, backward_rule, setup_context=setup_context)


def register_backend(name: str, namespace: str) -> None:
    """Registers backend `name`, whose kernels are the ops separable_conv1d and separable_conv1d_backward of
    torch.ops.<namespace> (and separable_conv1d_mul, the multiply fused, where the namespace has it)."""
    ops = getattr(torch.ops, namespace)
    register_rules(f"{namespace}::separable_conv1d", ops.separable_conv1d_backward.default)
    fused_multiply = hasattr(ops, "separable_conv1d_mul")

    def separable_conv1d_backend(x, depthwise_weight, pointwise_weight, bias, multiplier=None, cu_seqlens=None):
        if multiplier is not None and fused_multiply:
            inputs = backend.autocast_inputs(x.device.type, x, depthwise_weight, pointwise_weight, bias, multiplier)
            return ops.separable_conv1d_mul(*inputs, cu_seqlens)
        inputs = backend.autocast_inputs(x.device.type, x, depthwise_weight, pointwise_weight, bias)
        out = ops.separable_conv1d(*inputs, cu_seqlens)
        return out if multiplier is None else out * multiplier

    backend.register(name, OP, separable_conv1d_backend)


if cpp.LOADED:
    register_backend("cpp", "convbert_fast")
if triton.AVAILABLE:
    from .triton import separable_conv1d as _triton_kernels  # noqa: F401  (defines torch.ops.convbert_fast_triton.*)

    register_backend("triton", "convbert_fast_triton")


def separable_conv1d(
    x: torch.Tensor,
    depthwise_weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    bias: torch.Tensor,
    multiplier: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [B, L, C]; depthwise_weight [C, 1, K]; pointwise_weight [A, C, 1]; bias [A, 1] or [A] -> [B, L, A],
    times `multiplier` [B, L, A] when given (ConvBERT's multiply by the query; fused by the Triton kernel).

    Zero padding of K // 2 on both sides, as ``nn.Conv1d(padding=K // 2)``. With `cu_seqlens` (int32 or int64
    offsets [N + 1]: 0 = cu[0] <= ... <= cu[N] = T), B = 1 and the T tokens are N sequences packed end to end,
    each padded with zeros at its own ends, as if it ran alone.
    """
    tensors = dict(x=x, depthwise_weight=depthwise_weight, pointwise_weight=pointwise_weight, bias=bias)
    check_float_tensors(OP, **tensors, **({} if multiplier is None else {"multiplier": multiplier}))
    check_shape(OP, "x", x, (None, None, None), "[batch, seq_len, channels]")
    channels = x.shape[-1]
    check_shape(OP, "depthwise_weight", depthwise_weight, (channels, 1, None), f"[{channels}, 1, kernel_size]")
    check_kernel_size(OP, depthwise_weight.shape[-1], "depthwise_weight.shape[-1]")
    check_shape(OP, "pointwise_weight", pointwise_weight, (None, channels, 1), f"[out_channels, {channels}, 1]")
    out_channels = pointwise_weight.shape[0]
    if bias.shape not in ((out_channels,), (out_channels, 1)):
        raise ValueError(
            f"{OP}: `bias` must have shape [{out_channels}] or [{out_channels}, 1], got {list(bias.shape)}"
        )
    if multiplier is not None:
        expected = (x.shape[0], x.shape[1], out_channels)
        check_shape(OP, "multiplier", multiplier, expected, str(list(expected)))
    cu_seqlens = check_sequence_offsets(OP, cu_seqlens, x)
    return backend.implementation(OP, x.device)(
        x, depthwise_weight, pointwise_weight, bias, multiplier, cu_seqlens=cu_seqlens
    )
