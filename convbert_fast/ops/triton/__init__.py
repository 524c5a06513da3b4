"""The `triton` backend: Triton kernels registered with torch.library.triton_op, so torch.compile sees into them.

ops/triton/<op>.py defines the ops torch.ops.convbert_fast_triton.<op>*; ops/<op>.py imports it when Triton
imports, and registers their fake and autograd rules (explicit: the traced ones would run the kernels, which the
interpreter cannot do on fake tensors) and the backend's wrapper, the same code as for the cpp backend.

On CUDA tensors the kernels are compiled for the GPU; on CPU tensors they run only under TRITON_INTERPRET=1
(Triton's interpreter, which is how CI checks them), and the backend says so otherwise.
"""

from __future__ import annotations

import os

from .. import backend

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as error:  # not installed, or broken
    AVAILABLE = False
    backend.mark_failed("triton", f"triton did not import ({type(error).__name__}: {error}); `pip install triton`")
else:
    AVAILABLE = True

# Read when the kernels are defined (triton.jit looks at it then), so it must be set before this import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
