"""grouped_linear: ConvBERT's GroupedLinearLayer (num_groups independent linear maps over slices of the features)."""

from __future__ import annotations

import math

import torch

from . import backend
from .checks import check_float_tensors, check_shape

OP = "grouped_linear"


def grouped_linear_eager(x, weight, bias):
    """The seed's math: [N, G, Din/G] permuted to [G, N, Din/G], batched matmul, permuted back, bias."""
    num_groups, group_in, group_out = weight.shape
    leading = x.shape[:-1]
    y = x.reshape(math.prod(leading), num_groups, group_in).permute(1, 0, 2)  # [G, N, Din/G]
    y = torch.matmul(y, weight).permute(1, 0, 2)  # [N, G, Dout/G]
    return y.reshape(*leading, num_groups * group_out) + bias  # [..., Dout]


backend.register("eager", OP, grouped_linear_eager)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [..., Din]; weight [G, Din/G, Dout/G]; bias [Dout] -> [..., Dout]."""
    check_float_tensors(OP, x=x, weight=weight, bias=bias)
    check_shape(OP, "weight", weight, (None, None, None), "[num_groups, in_features / num_groups, out_features / num_groups]")
    num_groups, group_in, group_out = weight.shape
    if x.dim() < 1 or x.shape[-1] != num_groups * group_in:
        raise ValueError(
            f"{OP}: `x` must have shape [..., {num_groups * group_in}] (num_groups {num_groups} x {group_in}), "
            f"got {list(x.shape)}"
        )
    check_shape(OP, "bias", bias, (num_groups * group_out,), f"[{num_groups * group_out}]")
    return backend.implementation(OP, x.device)(x, weight, bias)
