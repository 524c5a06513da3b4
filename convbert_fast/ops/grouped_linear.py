"""grouped_linear: ConvBERT's GroupedLinearLayer (num_groups independent linear maps over slices of the features)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backend, cpp, triton
from .checks import check_float_tensors, check_shape

OP = "grouped_linear"


ACTIVATIONS = (None, "gelu")


def grouped_linear_eager(x, weight, bias, activation=None):
    """The seed's math: [N, G, Din/G] permuted to [G, N, Din/G], batched matmul, permuted back, bias."""
    num_groups, group_in, group_out = weight.shape
    leading = x.shape[:-1]
    y = x.reshape(math.prod(leading), num_groups, group_in).permute(1, 0, 2)  # [G, N, Din/G]
    y = torch.matmul(y, weight).permute(1, 0, 2)  # [N, G, Dout/G]
    y = y.reshape(*leading, num_groups * group_out) + bias  # [..., Dout]
    return F.gelu(y) if activation == "gelu" else y


backend.register("eager", OP, grouped_linear_eager)


def register_rules(forward, forward_gelu, backward) -> None:
    """Fake-tensor and autograd rules of a backend's grouped-linear ops: plain, with GELU (which also returns
    the pre-activation, kept for the backward), and the backward of the linear part (cpp and triton share them)."""

    def out_like(x, weight):
        return x.new_empty(*x.shape[:-1], weight.shape[0] * weight.shape[2])

    torch.library.register_fake(forward, lambda x, weight, bias: out_like(x, weight))
    torch.library.register_fake(forward_gelu, lambda x, weight, bias: (out_like(x, weight), out_like(x, weight)))
    torch.library.register_fake(
        backward,
        lambda grad, x, weight: (
            x.new_empty(x.shape),
            weight.new_empty(weight.shape),
            x.new_empty(weight.shape[0] * weight.shape[2]),
        ),
    )

    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)

    def backward_rule(ctx, grad_out):
        return backward(grad_out, *ctx.saved_tensors)

    def setup_context_gelu(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])  # output[1]: the pre-activation

    def backward_rule_gelu(ctx, grad_out, grad_pre):
        x, weight, pre = ctx.saved_tensors
        grad = torch.ops.aten.gelu_backward(grad_out, pre)
        if grad_pre is not None:
            grad = grad + grad_pre
        return backward(grad, x, weight)

    torch.library.register_autograd(forward, backward_rule, setup_context=setup_context)
    torch.library.register_autograd(forward_gelu, backward_rule_gelu, setup_context=setup_context_gelu)


def register_backend(name: str, namespace: str) -> None:
    """Registers backend `name`, whose kernels are the ops grouped_linear, grouped_linear_gelu and
    grouped_linear_backward of torch.ops.<namespace>: their rules, and the one wrapper over them."""
    ops = getattr(torch.ops, namespace)
    register_rules(
        f"{namespace}::grouped_linear", f"{namespace}::grouped_linear_gelu", ops.grouped_linear_backward.default
    )

    def grouped_linear_backend(x, weight, bias, activation=None):
        x, weight, bias = backend.autocast_inputs(x.device.type, x, weight, bias)
        if activation == "gelu":
            return ops.grouped_linear_gelu(x, weight, bias)[0]
        return ops.grouped_linear(x, weight, bias)

    backend.register(name, OP, grouped_linear_backend)


if cpp.LOADED:
    register_backend("cpp", "convbert_fast")
if triton.AVAILABLE:
    from .triton import grouped_linear as _triton_kernels  # noqa: F401  (defines torch.ops.convbert_fast_triton.*)

    register_backend("triton", "convbert_fast_triton")


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str | None = None
) -> torch.Tensor:
    """x [..., Din]; weight [G, Din/G, Dout/G]; bias [Dout] -> [..., Dout], then `activation` (None or "gelu")."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: `activation` must be None or 'gelu', got {activation!r}")
    check_float_tensors(OP, x=x, weight=weight, bias=bias)
    check_shape(
        OP, "weight", weight, (None, None, None), "[num_groups, in_features / num_groups, out_features / num_groups]"
    )
    num_groups, group_in, group_out = weight.shape
    if x.dim() < 1 or x.shape[-1] != num_groups * group_in:
        raise ValueError(
            f"{OP}: `x` must have shape [..., {num_groups * group_in}] (num_groups {num_groups} x {group_in}), "
            f"got {list(x.shape)}"
        )
    check_shape(OP, "bias", bias, (num_groups * group_out,), f"[{num_groups * group_out}]")
    return backend.implementation(OP, x.device)(x, weight, bias, activation)
