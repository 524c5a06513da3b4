"""The `triton` backend: Triton kernels registered with torch.library.triton_op, so torch.compile sees into them.

ops/triton/<op>.py defines the ops torch.ops.convbert_fast_triton.<op>*; ops/<op>.py imports it when Triton
imports, and registers their fake and autograd rules (explicit: the traced ones would run the kernels, which the
interpreter cannot do on fake tensors) and the backend's wrapper, the same code as for the cpp backend.

On CUDA tensors the kernels are compiled for the GPU; on CPU tensors they run only under TRITON_INTERPRET=1
(Triton's interpreter, which is how CI checks them), and the backend says so otherwise.
"""

from __future__ import annotations

import os

import torch

from .. import backend

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as error:  # not installed, or broken
    AVAILABLE = False
    backend.mark_failed("triton", f"triton did not import ({type(error).__name__}: {error}); `pip install triton`")
else:
    AVAILABLE = hasattr(torch.library, "triton_op")
    if not AVAILABLE:
        backend.mark_failed("triton", f"torch {torch.__version__} has no torch.library.triton_op (torch >= 2.6 has)")

# Read when the kernels are defined (triton.jit looks at it then), so it must be set before this import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version(text: str) -> tuple[int, int]:
    return tuple(int(part) for part in text.split(".")[:2])


def interpreter_gap() -> str | None:
    """Why Triton's interpreter cannot run our kernels on CPU tensors with these versions, else None."""
    import numpy

    if _version(triton.__version__) < (3, 9) and _version(numpy.__version__) >= (2, 4):
        # seen with triton 3.6; 3.9 is the first release run with numpy 2.4 here
        return (
            f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (its scalars become "
            "shape-(1,) arrays); numpy < 2.4 or triton >= 3.9 work"
        )

    @triton.jit
    def probe(x):
        pass

    try:
        torch.library.wrap_triton(probe)
    except RuntimeError as error:  # torch 2.11: only triton.jit's JITFunction, not the interpreter's function
        return f"Triton's interpreted kernels are refused by torch {torch.__version__}'s wrap_triton ({error})"
    return None


# CONVBERT_FAST_TRITON_AUTOTUNE=0 keeps one small config (tests: many shapes, each would be autotuned).
AUTOTUNE = os.environ.get("CONVBERT_FAST_TRITON_AUTOTUNE", "1") not in ("", "0") and not INTERPRET


def tuning_configs(tuned):
    """`tuned` (a list of triton.Config) when autotuning, else one small config (the interpreter runs every
    config it is given)."""
    if AUTOTUNE:
        return tuned
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]


def numerics(dtype) -> dict:
    """The kernels' numeric constants for inputs of `dtype`: the accumulator (fp64 for fp64, else fp32), the
    tl.dot precision (fp32 stays IEEE fp32, no TF32), and whether tl.dot gets its bf16 tiles as fp32: Triton's
    interpreter multiplies bf16 tiles as raw bits (bf16 x bf16 products are exact in fp32 and the accumulator
    is fp32 either way); GPUs take bf16 as is."""
    import torch
    import triton.language as tl

    return dict(
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        UPCAST_DOT=INTERPRET and dtype == torch.bfloat16,
    )


if AVAILABLE and not INTERPRET:
    backend.mark_device_unsupported(
        "triton",
        "cpu",
        "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (set before importing convbert_fast)",
    )
elif AVAILABLE and (gap := interpreter_gap()):
    backend.mark_device_unsupported("triton", "cpu", gap)
