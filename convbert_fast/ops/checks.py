"""Argument checks shared by the ops: every error names the argument, what was expected and what was given."""

from __future__ import annotations

import torch


def check_float_tensors(op: str, **tensors: torch.Tensor) -> None:
    """Tensors of a floating dtype on one device; one dtype too unless autocast mixes them on purpose."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: `{name}` must have a floating-point dtype, got {t.dtype}")
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(
                f"{op}: all tensors must be on one device; `{first_name}` is on {first.device}, `{name}` on {t.device}"
            )
    if not torch.is_autocast_enabled(first.device.type):
        for name, t in rest:
            if t.dtype != first.dtype:
                raise TypeError(
                    f"{op}: all tensors must share one dtype outside autocast; `{first_name}` is "
                    f"{first.dtype}, `{name}` is {t.dtype}"
                )


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    """`expected` holds ints, or None for any size; `what` spells the expected shape for the message."""
    if t.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected, t.shape)):
        raise ValueError(f"{op}: `{name}` must have shape {what}, got {list(t.shape)}")


def check_kernel_size(op: str, kernel_size: int, source: str) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"{op}: the kernel size must be odd and positive (the span is centred on each token), "
            f"got {kernel_size} from {source}"
        )
