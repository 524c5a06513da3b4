"""Backend choice for the four ops.

Each backend registers one implementation per op it covers (`triton` has no dropout_add_layer_norm); an op
that the chosen backend does not cover runs as under `auto`. ``auto`` takes the first available backend of a
per-device preference list; when it has to skip a backend that ships with this build but failed to
load, it warns once, so a slow path is never taken silently.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Iterator

import torch

OP_NAMES = ("separable_conv1d", "dynamic_span_conv", "grouped_linear", "dropout_add_layer_norm")
BACKEND_NAMES = ("eager", "cpp", "triton")
# The ops each backend implements: it is available once it registered them all.
BACKEND_OPS = {"eager": OP_NAMES, "cpp": OP_NAMES, "triton": OP_NAMES[:3]}

# Fastest first. `eager` is last everywhere: it always loads. Triton on the CPU is the interpreter: never auto.
_AUTO_PREFERENCE = {"cuda": ("cpp", "triton", "eager"), "cpu": ("cpp", "eager")}

# `auto` on CUDA: per GPU family and op, the backend that a committed benchmark record under
# benchmarks/results/ measured faster ((family, op) -> backend, each entry citing its record). No GPU record
# exists yet, so `cpp` leads everywhere.
MEASURED_CUDA_CHOICE: dict[tuple[str, str], str] = {}


@functools.lru_cache(maxsize=None)
def gpu_family(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return {9: "hopper", 8: "ampere"}.get(major, f"sm{major}{minor}")


def _auto_order(op_name: str, device: torch.device) -> tuple[str, ...]:
    order = _AUTO_PREFERENCE.get(device.type, ("eager",))
    if device.type == "cuda":
        choice = MEASURED_CUDA_CHOICE.get((gpu_family(device.index or 0), op_name))
        if choice is not None:
            order = (choice, *(name for name in order if name != choice))
    return order


_implementations: dict[str, dict[str, Callable]] = {name: {} for name in BACKEND_NAMES}
# Why a backend cannot be used at all (until it registers its ops, or because it failed to load).
_unavailable_reason: dict[str, str] = {
    "cpp": "convbert_fast._C has not been loaded",
    "triton": "the Triton kernels have not been loaded",
}
_failed_to_load: set[str] = set()
# (backend, device type) -> why a loaded backend cannot run there (say, _C built without CUDA).
_device_gaps: dict[tuple[str, str], str] = {}
_warned_fallback: set[tuple[str, str]] = set()
# backend -> a check run before each op it is chosen for on a device: why it cannot run there, or None (the cpp
# backend's, on CUDA, hands over CONVBERT_FAST_CUDA_KERNELS and asks whether _C holds code for that GPU).
_preflights: dict[str, Callable[[torch.device], str | None]] = {}
_selected = "auto"


def register(backend: str, op_name: str, fn: Callable) -> None:
    if backend not in BACKEND_NAMES or op_name not in BACKEND_OPS[backend]:
        raise ValueError(f"unknown backend/op pair {backend!r}/{op_name!r}")
    _implementations[backend][op_name] = fn
    if len(_implementations[backend]) == len(BACKEND_OPS[backend]):
        _unavailable_reason.pop(backend, None)


def mark_failed(backend: str, reason: str) -> None:
    """Record that `backend` ships with this build but could not be loaded, and why."""
    _unavailable_reason[backend] = reason
    _failed_to_load.add(backend)


def mark_device_unsupported(backend: str, device_type: str, reason: str) -> None:
    _device_gaps[(backend, device_type)] = reason


def set_preflight(backend: str, check: Callable[[torch.device], str | None]) -> None:
    """Run `check(device)` before each op dispatched to `backend` on `device`; a reason it returns makes `auto` skip
    the backend there (warning once per device) and an explicit choice of it raise."""
    _preflights[backend] = check


def _preflight(backend: str, device: torch.device) -> str | None:
    check = _preflights.get(backend)
    return check(device) if check is not None else None


def preflight_gaps() -> dict[tuple[str, str], str]:
    """``{(backend, "cuda:N"): why}`` for each visible GPU a loaded backend's preflight refuses (say, _C has no
    code for it)."""
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    gaps = {}
    for name in _preflights:
        if name in _unavailable_reason:
            continue
        for device in devices:
            if (reason := _preflight(name, device)) is not None:
                gaps[(name, str(device))] = reason
    return gaps


def available_backends() -> dict[str, str]:
    """``{name: "ok" or the reason it cannot be used}`` for every backend."""
    return {name: _unavailable_reason.get(name, "ok") for name in BACKEND_NAMES}


def device_gaps() -> dict[tuple[str, str], str]:
    """``{(backend, device type): why}`` for loaded backends that cannot run on some device type."""
    return dict(_device_gaps)


def autocast_inputs(device_type: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Custom kernels see no autocast: cast their inputs to the autocast dtype, as autocast does for a matmul."""
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in tensors)
    return tensors


def _check_usable(name: str) -> None:
    if name == "auto":
        return
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; valid: 'auto', " + ", ".join(repr(b) for b in BACKEND_NAMES))
    if name in _unavailable_reason:
        raise RuntimeError(f"backend {name!r} is not available: {_unavailable_reason[name]}")


def set_backend(name: str) -> None:
    """Use `name` ("auto", "eager", "cpp" or "triton") for every op it covers from now on."""
    global _selected
    _check_usable(name)
    _selected = name


def get_backend() -> str:
    return _selected


def fused_layers() -> bool:
    """Whether the model takes its fused layers (one GEMM for Q, K, V and conv_out; scaled_dot_product_attention;
    the span conv written after the attention half): under every choice but `eager`, which is the seed's math."""
    return _selected != "eager"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``set_backend(name)`` for the duration of a ``with`` block."""
    global _selected
    _check_usable(name)
    previous, _selected = _selected, name
    try:
        yield
    finally:
        _selected = previous


def implementation(op_name: str, device: torch.device) -> Callable:
    """The function that runs `op_name` for tensors on `device` under the current backend choice."""
    if _selected != "auto" and op_name in _implementations[_selected]:
        gap = _device_gaps.get((_selected, device.type)) or _preflight(_selected, device)
        if gap is not None:
            raise RuntimeError(f"backend {_selected!r} cannot run on {device}: {gap}")
        return _implementations[_selected][op_name]
    for name in _auto_order(op_name, device):
        if op_name not in BACKEND_OPS[name]:
            continue
        reason = _unavailable_reason.get(name) or _device_gaps.get((name, device.type))
        where = device.type
        if reason is None:
            reason, where = _preflight(name, device), str(device)
            if reason is None:
                return _implementations[name][op_name]
        shipped = name in _failed_to_load or (name, device.type) in _device_gaps or name in _preflights
        if shipped and (name, where) not in _warned_fallback:
            _warned_fallback.add((name, where))
            warnings.warn(
                f"convbert_fast: backend {name!r} cannot run on {where} ({reason}); 'auto' falls back to "
                "a slower backend. `python -m convbert_fast info` shows details.",
                RuntimeWarning,
                stacklevel=3,
            )
    raise AssertionError("unreachable: the eager backend is always available")
