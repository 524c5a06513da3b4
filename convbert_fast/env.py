"""The environment as `python -m convbert_fast info` and the benchmark records report it: versions, the device
and CPU name, the backends' status. A leaf module: it imports no other convbert_fast module at import time
(backend_status() reads convbert_fast.ops when called), so cli and bench both read it without importing each other.
"""

from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide how bf16 and fp16 run: ATen's and oneDNN's GEMMs take AMX or AVX512-BF16/FP16 tiles
# where the CPU has them, and emulate them in fp32 lanes where it does not.
LOW_PRECISION_FLAGS = ("amx_bf16", "amx_fp16", "amx_tile", "avx512_bf16", "avx512_fp16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (/proc/cpuinfo); empty where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa() -> dict:
    """The instruction sets the CPU code runs with: `kernels`, the x86 level of convbert_fast's C++ kernels
    ("avx512", "avx2" or "baseline"; None without convbert_fast._C; else why it cannot be told, say a bad
    CONVBERT_FAST_CPU_ISA), and `kernel_threads`, how many threads they run on (None without convbert_fast._C);
    `torch_cpu_capability`, the level of ATen's own vectorised kernels; whether the CPU has the native bf16/fp16
    instructions that oneDNN's GEMMs use (`amx`, `avx512_bf16`, `avx512_fp16`; None: unknown, /proc/cpuinfo
    unreadable), and `low_precision`, which of LOW_PRECISION_FLAGS it has."""
    from .ops import cpp

    try:
        kernels = cpp.cpu_isa()
    except ValueError as error:
        kernels = str(error).splitlines()[0]
    flags = cpu_flags()
    has = (lambda *names: all(n in flags for n in names)) if flags else (lambda *names: None)
    return {
        "kernels": kernels,
        "kernel_threads": cpp.cpu_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": has("amx_tile", "amx_bf16"),
        "avx512_bf16": has("avx512_bf16"),
        "avx512_fp16": has("avx512_fp16"),
        "low_precision": [flag for flag in LOW_PRECISION_FLAGS if flag in flags],
    }


def triton_version() -> str | None:
    """triton.__version__, or None where Triton does not import (triton_problem() says why)."""
    return None if triton_problem() else __import__("triton").__version__


def triton_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # not installed, or broken
        return f"{type(e).__name__}: {e}"
    return None


def versions() -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }


def backend_status() -> dict[str, list[str]]:
    """``{backend: ["ok" or why it cannot be used, then "but not on <device type or GPU>: why" per gap]}``."""
    from .ops import available_backends, backend

    status = {name: [ok] for name, ok in available_backends().items()}
    for (name, device), why in [*backend.device_gaps().items(), *backend.preflight_gaps().items()]:
        if status[name][0] == "ok":
            status[name].append(f"but not on {device}: {why}")
    return status
