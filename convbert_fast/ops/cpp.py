"""Loads convbert_fast._C, the C++/CUDA extension, whose library registers torch.ops.convbert_fast.*.

The op files register their fake (meta) and autograd rules and the `cpp` backend when LOADED is true.
"""

from __future__ import annotations

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


def cpu_isa() -> str | None:
    """The x86 level the C++ CPU kernels run at: "avx512" (x86-64-v4), "avx2" (x86-64-v3) or "baseline" (any
    other CPU). The best this CPU has unless CONVBERT_FAST_CPU_ISA (read at the first kernel call) or set_cpu_isa
    caps it. None where convbert_fast._C did not load; a ValueError where CONVBERT_FAST_CPU_ISA names no level this
    CPU has."""
    return torch.ops.convbert_fast.cpu_isa() if LOADED else None


def set_cpu_isa(level: str) -> str:
    """Runs the CPU kernels at `level` ("avx512", "avx2" or "baseline", at most what the CPU has) from now on, in
    every thread; returns the level in use before. For tests and benchmarks of the slower paths."""
    if not LOADED:
        raise RuntimeError("convbert_fast._C did not load: there are no CPU kernels to set")
    return torch.ops.convbert_fast.set_cpu_isa(level)
