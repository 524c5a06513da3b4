"""Loads convbert_fast._C, the C++/CUDA extension, whose library registers torch.ops.convbert_fast.*.

The op files register their fake (meta) and autograd rules and the `cpp` backend when LOADED is true.
"""

from __future__ import annotations

import functools
import os

import torch

from . import backend

try:
    from .. import _C  # noqa: F401
except ImportError as error:
    LOADED = False
    backend.mark_failed(
        "cpp",
        f"convbert_fast._C did not load ({error}); "
        "build it with `./install.sh` (pip install --no-build-isolation -e .)",
    )
else:
    LOADED = True
    if not torch._C._dispatch_has_kernel_for_dispatch_key("convbert_fast::dynamic_span_conv", "CUDA"):
        backend.mark_device_unsupported(
            "cpp", "cuda", "convbert_fast._C was built without CUDA kernels (setup.py said why when it built)"
        )

KERNELS_VARIABLE = "CONVBERT_FAST_CUDA_KERNELS"
_handed_over: str | None = None


def hand_over_kernel_choice() -> None:
    """CONVBERT_FAST_CUDA_KERNELS ("v2" or unset, "v1", "tiled": README, two sets of CUDA kernels), read here under the GIL,
    which os.environ's writers hold too, and handed to the C++ CUDA ops whenever its value changed. They read the
    choice once per op and pass it to every allocation and launch, and never call getenv while ops run (getenv
    racing another thread's setenv is undefined). A value they do not know raises ValueError."""
    global _handed_over
    value = os.environ.get(KERNELS_VARIABLE, "")
    if value != _handed_over:
        torch.ops.convbert_fast._cuda_kernels(value)
        _handed_over = value


@functools.cache
def missing_image(device_index: int) -> str | None:
    """Why _C's CUDA kernels cannot run on GPU `device_index` (no cubin for its architecture nor PTX its driver can
    compile: a GPU older than the arch list, or one built without +PTX), or None."""
    return torch.ops.convbert_fast._cuda_kernel_image(device_index) or None


def _cuda_preflight(device: torch.device) -> str | None:
    """Before an op on `device`: the kernel choice handed over, and `auto` told where _C has no code for the GPU
    (it falls back to Triton, then eager, warning once with this reason)."""
    if device.type != "cuda":
        return None
    hand_over_kernel_choice()
    return missing_image(device.index if device.index is not None else torch.cuda.current_device())


if LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("convbert_fast::dynamic_span_conv", "CUDA"):
    backend.set_preflight("cpp", _cuda_preflight)

def cpu_isa() -> str | None:
    """The x86 level the C++ CPU kernels run at: "avx512" (x86-64-v4), "avx2" (x86-64-v3) or "baseline" (any
    other CPU). The best this CPU has unless CONVBERT_FAST_CPU_ISA (read at the first kernel call) or set_cpu_isa
    caps it. None where convbert_fast._C did not load; a ValueError where CONVBERT_FAST_CPU_ISA names no level this
    CPU has."""
    return torch.ops.convbert_fast.cpu_isa() if LOADED else None


def cpu_threads() -> int | None:
    """How many threads the C++ CPU kernels run on: torch.get_num_threads() (one OpenMP pool, torch's) where
    convbert_fast._C was built with OpenMP, as setup.py builds it; 1 where it was not. None where _C did not load."""
    return torch.ops.convbert_fast.cpu_threads() if LOADED else None


def set_cpu_isa(level: str) -> str:
    """Runs the CPU kernels at `level` ("avx512", "avx2" or "baseline", at most what the CPU has) from now on, in
    every thread; returns the level in use before. For tests and benchmarks of the slower paths."""
    if not LOADED:
        raise RuntimeError("convbert_fast._C did not load: there are no CPU kernels to set")
    return torch.ops.convbert_fast.set_cpu_isa(level)
