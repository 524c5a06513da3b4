"""Argument checks shared by the ops: every error names the argument, what was expected and what was given."""

from __future__ import annotations

import weakref

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


# Offsets whose values were checked: id -> (weak reference, version counter, tokens, the int32 offsets). The model
# passes one cu_seqlens to every conv of a forward: its values are read (a device sync on a GPU) once, not per op.
_checked_offsets: dict[int, tuple] = {}


def check_sequence_offsets(op: str, cu_seqlens, x: torch.Tensor) -> torch.Tensor | None:
    """`cu_seqlens` (None, or int32/int64 offsets [N + 1] along the sequence dimension of a packed row `x` of shape
    [1, T, ...]: 0 = cu[0] <= cu[1] <= ... <= cu[N] = T) -> the int32 offsets the kernels take, or None. Their
    values are checked outside of tracing (torch.compile, torch.export see no values; the CPU kernels check them
    again when the graph runs)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: `cu_seqlens` must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: `cu_seqlens` must be int32 or int64 offsets, got {cu_seqlens.dtype}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"{op}: `cu_seqlens` is on {cu_seqlens.device} but the input on {x.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        shape = list(cu_seqlens.shape)
        raise ValueError(f"{op}: `cu_seqlens` must be 1-D offsets [N + 1] with N >= 1, got shape {shape}")
    if x.dim() < 2 or x.shape[0] != 1:
        raise ValueError(f"{op}: with `cu_seqlens` the input must be one packed row [1, T, ...], got {list(x.shape)}")
    total = x.shape[1]
    if torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(cu_seqlens):
        return cu_seqlens.to(torch.int32)
    cacheable = not cu_seqlens.is_inference()  # an inference tensor has no version counter to tell a change by
    hit = _checked_offsets.get(id(cu_seqlens)) if cacheable else None
    if hit is not None and hit[0]() is cu_seqlens and hit[1:3] == (cu_seqlens._version, total):
        return hit[3]
    offsets = cu_seqlens.tolist()
    problem = None
    if offsets[0] != 0:
        problem = f"must start at 0, got {offsets[0]}"
    elif any(b < a for a, b in zip(offsets, offsets[1:])):
        i = next(i for i, (a, b) in enumerate(zip(offsets, offsets[1:])) if b < a)
        problem = (
            f"must not decrease (a negative length): cu_seqlens[{i + 1}] = {offsets[i + 1]} < "
            f"cu_seqlens[{i}] = {offsets[i]}"
        )
    elif offsets[-1] != total:
        problem = f"must end at the {total} tokens of the input, got {offsets[-1]}"
    if problem is not None:
        shown = offsets if len(offsets) <= 12 else offsets[:6] + ["..."] + offsets[-3:]
        raise ValueError(f"{op}: `cu_seqlens` {shown} {problem}")
    checked = cu_seqlens.to(torch.int32).contiguous()
    if not cacheable:
        return checked
    key = id(cu_seqlens)
    ref = weakref.ref(cu_seqlens, lambda _, key=key, cache=_checked_offsets: cache.pop(key, None))
    _checked_offsets[key] = (ref, cu_seqlens._version, total, checked)
    return checked


def sequence_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of each non-empty sequence, read from checked offsets (the eager math's loop)."""
    offsets = cu_seqlens.tolist()
    return [(start, end) for start, end in zip(offsets, offsets[1:]) if end > start]
