"""dynamic_span_conv: ConvBERT's span-based dynamic convolution.

For token t and conv head h, a softmax over that head's K logits weighs the K value rows
t - (K-1)/2 ... t + (K-1)/2 of that head's channels (zero outside [0, L), padded tokens included). With
`cu_seqlens`, one packed row of sequences: zero outside each token's own sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backend, cpp, triton
from .checks import check_float_tensors, check_kernel_size, check_sequence_offsets, check_shape, sequence_bounds

OP = "dynamic_span_conv"


def dynamic_span_conv_eager(values, kernel_logits, num_heads, prefix=None, cu_seqlens=None):
    """The seed's math: per-head softmax, `unfold` into a K-times larger tensor, one matmul per (token, head);
    then, given a prefix, the seed's `cat` of the attention half before it. Packed sequences (cu_seqlens): the
    same, one sequence at a time."""
    if prefix is not None:
        conv = dynamic_span_conv_eager(values, kernel_logits, num_heads, cu_seqlens=cu_seqlens)
        return torch.cat([prefix.reshape(*prefix.shape[:2], math.prod(prefix.shape[2:])), conv], dim=-1)
    if cu_seqlens is not None:
        pieces = [
            dynamic_span_conv_eager(values[:, start:end], kernel_logits[:, start:end], num_heads)
            for start, end in sequence_bounds(cu_seqlens)
        ]
        return torch.cat(pieces, dim=1) if pieces else values.new_empty(values.shape)
    batch, seq_len, all_head_size = values.shape
    kernel_size = kernel_logits.shape[-1] // num_heads
    head_size = all_head_size // num_heads
    rows = batch * seq_len * num_heads
    weights = torch.softmax(kernel_logits.reshape(rows, kernel_size, 1), dim=1)  # [B*L*H, K, 1]
    spans = F.unfold(
        values.transpose(1, 2).contiguous().unsqueeze(-1),  # [B, A, L, 1]
        kernel_size=[kernel_size, 1],
        padding=[(kernel_size - 1) // 2, 0],
    )  # [B, A*K, L]
    spans = spans.transpose(1, 2).reshape(batch, seq_len, all_head_size, kernel_size)
    spans = spans.reshape(rows, head_size, kernel_size)  # [B*L*H, D, K]
    return torch.matmul(spans, weights).reshape(batch, seq_len, all_head_size)  # [B, L, A]


backend.register("eager", OP, dynamic_span_conv_eager)


def register_rules(forward, backward) -> None:
    """Fake-tensor and autograd rules of a backend's span-conv op pair (the cpp and triton backends share them).
    The softmax is recomputed from the logits in the backward: nothing but the inputs is kept."""
    torch.library.register_fake(
        forward, lambda values, kernel_logits, num_heads, cu_seqlens=None: values.new_empty(values.shape)
    )
    torch.library.register_fake(
        backward,
        lambda grad, values, logits, num_heads, cu_seqlens=None: (
            values.new_empty(values.shape),
            logits.new_empty(logits.shape),
        ),
    )

    def setup_context(ctx, inputs, output):
        values, kernel_logits, ctx.num_heads, cu_seqlens = inputs
        ctx.save_for_backward(values, kernel_logits, cu_seqlens)

    def backward_rule(ctx, grad_out):
        values, kernel_logits, cu_seqlens = ctx.saved_tensors
        return (*backward(grad_out, values, kernel_logits, ctx.num_heads, cu_seqlens), None, None)

    torch.library.register_autograd(forward, backward_rule, setup_context=setup_context)


def prefix_width(prefix_shape) -> int:
    return math.prod(prefix_shape[2:])


def register_concat_rules(concat, backward) -> None:
    """The same for the op that writes [prefix | span conv] along the channels: the prefix's gradient is a view
    of the incoming one, the span conv's is the span-conv backward of the rest."""

    def fake(prefix, values, kernel_logits, num_heads, cu_seqlens=None):
        return values.new_empty(values.shape[0], values.shape[1], prefix_width(prefix.shape) + values.shape[2])

    torch.library.register_fake(concat, fake)

    def setup_context(ctx, inputs, output):
        prefix, values, kernel_logits, ctx.num_heads, cu_seqlens = inputs
        ctx.prefix_shape = prefix.shape
        ctx.save_for_backward(values, kernel_logits, cu_seqlens)

    def backward_rule(ctx, grad_out):
        width = prefix_width(ctx.prefix_shape)
        grad_prefix = grad_out[..., :width].reshape(ctx.prefix_shape)
        values, kernel_logits, cu_seqlens = ctx.saved_tensors
        grads = backward(grad_out[..., width:], values, kernel_logits, ctx.num_heads, cu_seqlens)
        return grad_prefix, *grads, None, None

    torch.library.register_autograd(concat, backward_rule, setup_context=setup_context)


def register_backend(name: str, namespace: str) -> None:
    """Registers backend `name`, whose kernels are the ops dynamic_span_conv, dynamic_span_conv_concat and
    dynamic_span_conv_backward of torch.ops.<namespace>: their rules, and the one wrapper over them."""
    ops = getattr(torch.ops, namespace)
    register_rules(f"{namespace}::dynamic_span_conv", ops.dynamic_span_conv_backward.default)
    register_concat_rules(f"{namespace}::dynamic_span_conv_concat", ops.dynamic_span_conv_backward.default)

    def dynamic_span_conv_backend(values, kernel_logits, num_heads, prefix=None, cu_seqlens=None):
        if prefix is not None:
            prefix, values, kernel_logits = backend.autocast_inputs(values.device.type, prefix, values, kernel_logits)
            return ops.dynamic_span_conv_concat(prefix, values, kernel_logits, num_heads, cu_seqlens)
        values, kernel_logits = backend.autocast_inputs(values.device.type, values, kernel_logits)
        return ops.dynamic_span_conv(values, kernel_logits, num_heads, cu_seqlens)

    backend.register(name, OP, dynamic_span_conv_backend)


if cpp.LOADED:
    # The CUDA kernels take K up to kMaxCudaKernelSize (csrc/cuda/launchers.h) and raise a ValueError beyond.
    register_backend("cpp", "convbert_fast")

    @torch.library.register_fake("convbert_fast::dynamic_span_conv_into")
    def _(values, kernel_logits, num_heads, out, cu_seqlens=None):
        return None


if triton.AVAILABLE:
    from .triton import dynamic_span_conv as _triton_kernels  # noqa: F401  (defines torch.ops.convbert_fast_triton.*)

    register_backend("triton", "convbert_fast_triton")


def dynamic_span_conv(
    values: torch.Tensor,
    kernel_logits: torch.Tensor,
    num_heads: int,
    prefix: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """values [B, L, A]; kernel_logits [B, L, num_heads * K] (before the softmax) -> [B, L, A].

    With `prefix` [B, L, ...] (P elements per token): [B, L, P + A], the prefix's elements first, then the span
    conv, as ``torch.cat([prefix.reshape(B, L, P), conv], -1)`` but written in place by the kernels.

    With `cu_seqlens` (int32 or int64 offsets [N + 1]: 0 = cu[0] <= ... <= cu[N] = T), B = 1 and the T tokens are
    N sequences packed end to end: each token's span reaches only its own sequence, as if it ran alone.
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool):
        raise TypeError(f"{OP}: `num_heads` must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"{OP}: `num_heads` must be at least 1, got {num_heads}")
    check_float_tensors(
        OP, values=values, kernel_logits=kernel_logits, **({} if prefix is None else {"prefix": prefix})
    )
    check_shape(OP, "values", values, (None, None, None), "[batch, seq_len, all_head_size]")
    batch, seq_len, all_head_size = values.shape
    check_shape(
        OP, "kernel_logits", kernel_logits, (batch, seq_len, None), f"[{batch}, {seq_len}, num_heads * kernel_size]"
    )
    if all_head_size % num_heads:
        raise ValueError(f"{OP}: values.shape[-1] = {all_head_size} is not divisible by num_heads = {num_heads}")
    if kernel_logits.shape[-1] % num_heads:
        raise ValueError(
            f"{OP}: kernel_logits.shape[-1] = {kernel_logits.shape[-1]} is not divisible by num_heads = {num_heads}"
        )
    check_kernel_size(OP, kernel_logits.shape[-1] // num_heads, "kernel_logits.shape[-1] // num_heads")
    cu_seqlens = check_sequence_offsets(OP, cu_seqlens, values)
    if prefix is not None and (prefix.dim() < 2 or prefix.shape[:2] != values.shape[:2]):
        raise ValueError(f"{OP}: `prefix` must have shape [{batch}, {seq_len}, ...], got {list(prefix.shape)}")
    return backend.implementation(OP, values.device)(
        values, kernel_logits, num_heads, prefix=prefix, cu_seqlens=cu_seqlens
    )
