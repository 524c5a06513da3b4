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


# Loops over the K taps are unrolled up to this K (ConvBERT's own K is 9); longer ones run as loops over a runtime
# trip count (kernel_size), so that neither Triton nor LLVM unrolls them: unrolled, K = 15 spilled up to 7 KB
# and K = 63 took minutes to compile.
MAX_UNROLL = triton.language.constexpr(9) if AVAILABLE else None
# two warps: with one, 8 B spilled on sm_90 (triton 3.6, fp16 separable conv)
NO_AUTOTUNE_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=2) if AVAILABLE else None


if AVAILABLE:
    import triton.language as tl

    @triton.jit
    def sequence_window(cu_seqlens_ptr, num_seqs, rows, total_rows, SEARCH_STEPS: tl.constexpr):
        """(lo, hi), int32: row + d lies in the sequence of `row` iff lo <= d < hi, for each of `rows` of a packed row
        of `total_rows` tokens split by the offsets cu_seqlens [num_seqs + 1].

        A row's sequence is the last s in [0, num_seqs) with cu[s] <= row (an empty sequence starts where the next
        one does, so it is passed over), found by a binary search of SEARCH_STEPS = ceil(log2(num_seqs)) steps
        over all rows at once, unrolled: a search loop would carry the rows through scf.for/while, where Triton
        gives them a layout of its own and then converts every tap's mask back, in the separable forward's tap loop
        through shared memory; unrolled, the loads are rematerialised in the rows' own layout. Every offset read is
        in [0, num_seqs] and the bounds are clamped to [0, total_rows]: whatever the offsets hold, a row read inside
        the window is in the input."""
        rows = rows.to(tl.int32)  # the offsets are int32: so are the rows they split, and 32-bit compares are cheaper
        seq = tl.zeros(rows.shape, dtype=tl.int32)
        for step in tl.static_range(SEARCH_STEPS):
            probe = seq + (1 << (SEARCH_STEPS - 1 - step))
            inside = probe < num_seqs
            seq = tl.where(inside & (tl.load(cu_seqlens_ptr + probe, mask=inside, other=0) <= rows), probe, seq)
        start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + seq), 0), total_rows)
        end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + seq + 1), start), total_rows)
        return start - rows, end - rows

    @triton.jit
    def tap_inside(position, lo, hi, offset, K: tl.constexpr, PACKED: tl.constexpr):
        """Whether each row's tap at `offset` (-(K-1)/2 ... (K-1)/2) stays inside its window (position, lo, hi), as
        window() gives it: position + offset in [lo, hi); packed with K <= 63, bit offset + (K-1)/2 of lo."""
        if PACKED and K <= 63:
            return ((lo >> (offset + (K - 1) // 2)) & 1) != 0
        else:
            at = position + offset
            return (at >= lo) & (at < hi)

    @triton.jit
    def window(cu_seqlens_ptr, num_seqs, rows, position, seq_len, total_rows, K: tl.constexpr,
               SEARCH_STEPS: tl.constexpr, PACKED: tl.constexpr):
        """(position, lo, hi): a row's tap at row + d may be read iff tap_inside(position, lo, hi, d). Unpacked:
        (the rows' `position` in their sequence, 0, L). Packed: (0, sequence_window's [lo, hi) relative to the
        row); for K <= 63 the taps inside it as the bits of one int32 (K <= 31) or int64 in lo, tested with a shift
        by the tap that no loop can hoist. The windows of the separable forward's rows live through its channel
        loop: kept as two bounds (compared with each tap, the compiler hoisted more per row) they spilled on sm_80
        (fp16 64x64x32 w4: 16 B at K = 3, 80 B at K = 63); as bits, none. Wider K keeps the two bounds."""
        if PACKED:
            lo, hi = sequence_window(cu_seqlens_ptr, num_seqs, rows, total_rows, SEARCH_STEPS)
            reach = (K - 1) // 2
            if K <= 63:
                first = tl.minimum(tl.maximum(lo + reach, 0), K)
                last = tl.minimum(tl.maximum(hi + reach, first), K)
                one = tl.full(lo.shape, 1, tl.int32 if K <= 31 else tl.int64)
                return 0, (one << last.to(one.dtype)) - (one << first.to(one.dtype)), 0  # bits first ... last - 1
            else:
                return 0, lo, hi
        else:
            return position, 0, seq_len


def search_steps(num_seqs) -> int:
    """ceil(log2(num_seqs)): the binary search's steps, a constexpr of the kernels (one compile per power of two of
    the sequence count). Comparisons only, so that a symbolic count under torch.compile gives a guard on its range."""
    steps = 0
    while (1 << steps) < num_seqs:
        steps += 1
    return steps


def packing(cu_seqlens, fallback) -> dict:
    """The kernels' packing arguments: the offsets (or any tensor, unread, for an unpacked input), their number of
    sequences, the search's steps and the PACKED flag that compiles the search in (off, the unpacked code is what
    it was)."""
    if cu_seqlens is None:
        return {"cu_seqlens_ptr": fallback, "num_seqs": 1, "SEARCH_STEPS": 0, "PACKED": False}
    num_seqs = cu_seqlens.shape[0] - 1
    steps = search_steps(num_seqs)
    return {"cu_seqlens_ptr": cu_seqlens.contiguous(), "num_seqs": num_seqs, "SEARCH_STEPS": steps, "PACKED": True}


def tuning_configs(tuned):
    """`tuned` (a list of triton.Config) when autotuning, else one small config (the interpreter runs every
    config it is given)."""
    if AUTOTUNE:
        return tuned
    return [NO_AUTOTUNE_CONFIG]


def fp32_dots_take_tf32() -> bool:
    """Whether torch's own CUDA matmuls take TF32 for fp32 now (torch.backends.cuda.matmul.fp32_precision, which
    torch.set_float32_matmul_precision and the legacy allow_tf32 flag also set); the fp32 dots follow it."""
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; "none" inherits the global setting, shown here
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_family(dtype) -> str:
    """How the kernels' dots run for inputs of `dtype`, each with its own tile configs: "16bit" (fp16/bf16 on
    tensor cores), "tf32" (fp32 as TF32 on tensor cores), "ieee" (fp32 in full precision: FMA dots whose
    accumulators live in registers, so smaller tiles) or "fp64"."""
    import torch

    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32" if fp32_dots_take_tf32() else "ieee"
    return "16bit"


def numerics(dtype) -> dict:
    """The kernels' numeric constants for inputs of `dtype`: the accumulator (fp64 for fp64, else fp32), the
    tl.dot precision (see dot_family), and whether tl.dot gets its bf16 tiles as fp32: Triton's interpreter
    multiplies bf16 tiles as raw bits (bf16 x bf16 products are exact in fp32 and the accumulator is fp32 either
    way); GPUs take bf16 as is."""
    import torch
    import triton.language as tl

    return dict(
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION="ieee" if dot_family(dtype) in ("ieee", "fp64") else "tf32",
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
