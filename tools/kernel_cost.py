#!/usr/bin/env python
"""An instruction budget for the CUDA kernels, measured without a GPU (issue 17).

For each kernel at ConvBERT-base, bf16, B=32, L=512 (6 conv heads of 64, K=9, C=768, 16384 LayerNorm rows):
  bytes     what the kernel must move (each input read once, each output written once), and that time at 3.0 TB/s
  warp-ins  the warp-instructions it issues: the static SASS count (cuobjdump -sass, sm_90) of straight code
            once per warp, of each loop body times its trip count per warp (from the launch geometry)
  issue     warp-ins / (132 SMs x 4 warp-instructions per clock x 1.75 GHz), an H100 SXM's issue rate
  regs, spills   from ptxas -v
  ratio     issue time / memory time: above ~0.7 the kernel cannot reach ~70% of the bandwidth
Static counts take both sides of every branch (an upper bound where a branch skips code for a whole warp), leave
out the subroutines entered by CALL (the slow paths of 64-bit division, IEEE division and sqrt, for operands out
of the fast path's range) and count no stall: the table says whether issue can keep up with memory, not how
fast a kernel runs.

    python tools/kernel_cost.py            the table (v1: the general kernels; v2: the tiled ones)
    python tools/kernel_cost.py --check    also exit 1 when a v2 kernel's ratio is over 0.7 or it spills
    python tools/kernel_cost.py --sass DIR  keep the cubins and SASS listings in DIR

Each kernel's loops are named below with their trip counts; when the compiler's loop structure changes, the
tool stops and prints the loops it found instead of guessing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISSUE_RATE = 132 * 4 * 1.75e9  # warp-instructions per second
BANDWIDTH = 3.0e12  # bytes per second
RATIO_TARGET = 0.7
# as CMakeLists.txt's CUDA_FLAGS (torch's extension defines), plus sm_90 and ptxas' report
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-arch=sm_90",
    "-cubin",
    "-Xptxas",
    "-v",
]

# ConvBERT-base at the issue's sizes
B, L, H, D, K, C = 32, 512, 6, 64, 9, 768
W = H * D  # the span conv's width
ROWS = B * L
BF16, FP32 = 2, 4


@dataclasses.dataclass
class Kernel:
    name: str  # what the table shows
    version: str  # v1 (general) or v2 (tiled)
    source: str  # csrc/cuda/<source>
    symbol: str  # a regex on the mangled name: the bf16 (K=9) instantiation
    warps: int  # warps launched
    trips: list[float]  # per-warp trip count of each loop (an average where it varies), in address order
    bytes: int  # bytes it must move
    note: str = ""
    block_warps: int = 4  # warps per block (occupancy)


def ceil_div(a, b):
    return -(-a // b)


LN_ROWS_PER_WARP = 4  # v2 LayerNorm forward (csrc/cuda/dropout_add_layer_norm.cu)
LN_BACKWARD_ROWS_PER_WARP = 8  # v2 LayerNorm backward
LN_PARTIAL_ROWS = 4 * LN_BACKWARD_ROWS_PER_WARP  # rows per block of partial sums
DW_TILE = 32  # v2 depthwise: tokens per thread
DW_WG_TILE = 128  # v2 depthwise weight gradient: tokens per chunk


def cuda_kernels(batch: int, seq_len: int) -> list[Kernel]:
    """The CUDA kernels' rows at ConvBERT-base, bf16 (fp32 where named), `batch` rows of `seq_len` tokens."""
    B, L = batch, seq_len  # noqa: N806: the shape's names, as in the rows below
    ROWS = B * L  # noqa: N806
    SPAN_TILES = B * H * ceil_div(L, 64)  # noqa: N806: v2, one warp per (batch, head, 64 tokens)
    kernels = [
        # --- the general (v1) kernels: one warp per (token, head), one thread per element, one block per row
        Kernel(
            "span conv fwd",
            "v1",
            "dynamic_span_conv.cu",
            r"span_conv_forward_kernelI13__nv_bfloat16Li9ELb0E",
            warps=B * L * H,
            trips=[2],
            bytes=BF16 * (2 * ROWS * W + ROWS * H * K),
            note="loop: the lane's 2 channels of 64",
        ),
        Kernel(
            "span conv bwd: logits",
            "v1",
            "dynamic_span_conv.cu",
            r"span_conv_backward_logits_kernelI13__nv_bfloat16Li9ELb0E",
            warps=B * L * H,
            trips=[K, 2],
            bytes=BF16 * (2 * ROWS * W + 2 * ROWS * H * K) + FP32 * ROWS * H * K,
            note="loops: taps, the lane's 2 channels; writes the fp32 weights",
        ),
        Kernel(
            "span conv bwd: values",
            "v1",
            "dynamic_span_conv.cu",
            r"span_conv_backward_values_kernelI13__nv_bfloat16Li9ELb0E",
            warps=B * L * H,
            trips=[2, K],
            bytes=BF16 * 2 * ROWS * W + FP32 * ROWS * H * K,
            note="loops: the lane's 2 channels, taps",
        ),
        Kernel(
            "depthwise fwd",
            "v1",
            "separable_conv1d.cu",
            r"depthwise_conv_forward_kernelI13__nv_bfloat16Li9ELb0E",
            warps=ROWS * C // 32,
            trips=[1],
            bytes=BF16 * 2 * ROWS * C,
            note="grid-stride loop: once",
            block_warps=8,
        ),
        Kernel(
            "depthwise weight grad",
            "v1",
            "separable_conv1d.cu",
            r"depthwise_conv_weight_grad_kernelI13__nv_bfloat16Lb0E",
            warps=ceil_div(C, 256) * (ROWS // 64) * 8,
            trips=[0, 0, 0, K, 64 // 4],
            bytes=BF16 * 2 * ROWS * C + FP32 * (ROWS // 64) * K * C,
            note="loops: 3 for an empty chunk (not run), taps, 64 rows 4 per iteration",
            block_warps=8,
        ),
        Kernel(
            "LayerNorm fwd",
            "v1",
            "dropout_add_layer_norm.cu",
            r"dropout_add_layer_norm_forward_kernelI13__nv_bfloat16E",
            warps=ROWS * 8,
            trips=[C // 256] * 3,
            bytes=BF16 * 3 * ROWS * C + FP32 * 2 * ROWS,
            note="a block of 8 warps per row; 3 passes of 3 elements per thread",
            block_warps=8,
        ),
        Kernel(
            "LayerNorm fwd fp32",
            "v1",
            "dropout_add_layer_norm.cu",
            r"dropout_add_layer_norm_forward_kernelIfE",
            warps=ROWS * 8,
            trips=[C // 256] * 3,
            bytes=FP32 * 3 * ROWS * C + FP32 * 2 * ROWS,
            note="under autocast (the op runs in fp32), as v1 before fp32 C=768 had v2",
            block_warps=8,
        ),
        Kernel(
            "LayerNorm bwd fp32",
            "v1",
            "dropout_add_layer_norm.cu",
            r"dropout_add_layer_norm_backward_kernelIfE",
            warps=ROWS * 8,
            trips=[C // 256] * 2,
            bytes=FP32 * 5 * ROWS * C + FP32 * (2 * ROWS + ROWS * C),
            note="under autocast, as v1 before fp32 C=768 had v2",
            block_warps=8,
        ),
        Kernel(
            "LayerNorm bwd",
            "v1",
            "dropout_add_layer_norm.cu",
            r"dropout_add_layer_norm_backward_kernelI13__nv_bfloat16E",
            warps=ROWS * 8,
            trips=[C // 256] * 2,
            bytes=BF16 * 5 * ROWS * C + FP32 * (2 * ROWS + ROWS * C),
            note="writes grad * xhat in fp32 [rows, C], summed by ATen",
            block_warps=8,
        ),
        # --- the tiled (v2) kernels
        Kernel(
            "span conv fwd",
            "v2",
            "dynamic_span_conv.cu",
            r"span_conv_forward_tiled_kernelI13__nv_bfloat16Li9ELb1ELb0E",
            warps=SPAN_TILES,
            trips=[],
            bytes=BF16 * (2 * ROWS * W + ROWS * H * K),
            note="unrolled: 2 x 32 tokens x 9 taps per warp",
        ),
        Kernel(
            "span conv bwd",
            "v2",
            "dynamic_span_conv.cu",
            r"span_conv_backward_tiled_kernelI13__nv_bfloat16Li9ELb1ELb0E",
            warps=SPAN_TILES,
            trips=[3],
            bytes=BF16 * (3 * ROWS * W + 2 * ROWS * H * K),
            note="loop: 3 softmax rounds (64 + 8 tokens); both gradients in one pass",
        ),
        Kernel(
            "depthwise fwd",
            "v2",
            "separable_conv1d.cu",
            r"depthwise_conv_forward_tiled_kernelI13__nv_bfloat16Li9ELb1ELb0E",
            warps=B * ceil_div(L, DW_TILE) * ceil_div(C, 32 * 4),
            trips=[],
            bytes=BF16 * 2 * ROWS * C,
            note=f"unrolled: a lane per 4 channels and {DW_TILE} tokens",
        ),
        Kernel(
            "depthwise weight grad",
            "v2",
            "separable_conv1d.cu",
            r"depthwise_conv_weight_grad_tiled_kernelI13__nv_bfloat16Li9ELb1ELb0E",
            warps=B * ceil_div(L, DW_WG_TILE) * ceil_div(C, 32 * 2),
            trips=[ceil_div(DW_WG_TILE, K)],
            bytes=BF16 * 2 * ROWS * C + FP32 * B * ceil_div(L, DW_WG_TILE) * K * C,
            note=f"loop: {DW_WG_TILE} tokens, {K} per unrolled body; a lane per 2 channels",
        ),
        Kernel(
            "LayerNorm fwd",
            "v2",
            "dropout_add_layer_norm.cu",
            r"dropout_add_layer_norm_forward_tiled_kernelI13__nv_bfloat16Li3ELb1E",
            warps=ROWS // LN_ROWS_PER_WARP,
            trips=[LN_ROWS_PER_WARP],
            bytes=BF16 * 3 * ROWS * C + FP32 * 2 * ROWS,
            note=f"a warp per row, {LN_ROWS_PER_WARP} rows per warp",
        ),
        Kernel(
            "LayerNorm bwd",
            "v2",
            "dropout_add_layer_norm.cu",
            r"dropout_add_layer_norm_backward_tiled_kernelI13__nv_bfloat16Li3ELb1E",
            warps=ROWS // LN_BACKWARD_ROWS_PER_WARP,
            trips=[LN_BACKWARD_ROWS_PER_WARP, C // 128, C // 128],
            bytes=BF16 * 5 * ROWS * C + FP32 * (2 * ROWS + 2 * (ROWS // LN_PARTIAL_ROWS) * C),
            note=f"loops: {LN_BACKWARD_ROWS_PER_WARP} rows per warp; the block's column sums of d(weight), d(bias)",
        ),
        Kernel(
            "LayerNorm fwd fp32",
            "v2",
            "dropout_add_layer_norm.cu",
            r"dropout_add_layer_norm_forward_tiled_kernelIfLi6ELb1E",
            warps=ROWS // LN_ROWS_PER_WARP,
            trips=[LN_ROWS_PER_WARP],
            bytes=FP32 * 3 * ROWS * C + FP32 * 2 * ROWS,
            note="under autocast: 6 vectors of 4 per lane",
        ),
        Kernel(
            "LayerNorm bwd fp32",
            "v2",
            "dropout_add_layer_norm.cu",
            r"dropout_add_layer_norm_backward_tiled_kernelIfLi6ELb1E",
            warps=ROWS // LN_BACKWARD_ROWS_PER_WARP,
            trips=[LN_BACKWARD_ROWS_PER_WARP, C // 128, C // 128],
            bytes=FP32 * 5 * ROWS * C + FP32 * (2 * ROWS + 2 * (ROWS // LN_PARTIAL_ROWS) * C),
            note="under autocast: 6 vectors of 4 per lane",
        ),
    ]
    return with_packed(kernels, B, L)


# Packed sequences (cu_seqlens, issue 23): the same B x L tokens as one row of B sequences of L, run by each conv
# kernel's packed instantiation (symbol ...Lb1E; the same bytes, warps and loops, plus these). SEARCH: the iterations
# of the binary search over the B + 1 offsets that finds a token's sequence (common.cuh: sequence_of).
V1_WG_CHUNK = 64  # v1 depthwise weight gradient: rows per chunk; a search at its first row and at each boundary


def packed_trips(sequences: int, seq_len: int) -> dict[tuple[str, str], tuple[list[float], str]]:
    """(version, name) -> (trips, note) of the packed rows: `sequences` sequences of `seq_len` in one row."""
    search = math.ceil(math.log2(sequences)) if sequences > 1 else 0
    walk = (1 + V1_WG_CHUNK / seq_len) * search / V1_WG_CHUNK
    return {
        ("v1", "span conv fwd"): ([search, 2], "+ a search per warp"),
        ("v1", "span conv bwd: logits"): ([search, K, 2], "+ a search per warp"),
        ("v1", "span conv bwd: values"): ([search, 2, K], "+ a search per warp"),
        ("v1", "depthwise fwd"): ([0, 1, search], "the loop's one-sequence copy not run; a search per element"),
        ("v1", "depthwise weight grad"): (
            [0, 0, 0, K, 0, V1_WG_CHUNK, walk],
            "per tap: the rows' walk (its one-sequence copy not run), a search where it leaves a sequence",
        ),
        ("v2", "span conv fwd"): ([search, search], "+ a search per token (2 rounds), a predicate per tap"),
        ("v2", "span conv bwd"): ([3, search, search], "+ a search per token (2 rounds), zeroed weights for d(values)"),
        ("v2", "depthwise fwd"): ([search], "+ a search per lane's token, a shuffle per token, a predicate per tap"),
        ("v2", "depthwise weight grad"): (
            [search] * 4 + [ceil_div(DW_WG_TILE, K)],
            "+ 4 searches per lane into shared memory, a predicate per tap",
        ),
    }


def with_packed(kernels: list[Kernel], sequences: int, seq_len: int) -> list[Kernel]:
    """Each conv kernel followed by its packed instantiation."""
    packed = packed_trips(sequences, seq_len)
    rows = []
    for kernel in kernels:
        rows.append(kernel)
        if (kernel.version, kernel.name) in packed:
            trips, note = packed[kernel.version, kernel.name]
            assert kernel.symbol.endswith("Lb0E"), kernel.symbol
            packed_symbol = kernel.symbol[: -len("Lb0E")] + "Lb1E"
            rows.append(
                dataclasses.replace(kernel, name=kernel.name + " packed", symbol=packed_symbol, trips=trips, note=note)
            )
    return rows


KERNELS = cuda_kernels(B, L)  # the rows at the default shape


def find_tool(name: str, nvcc: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    beside = os.path.join(os.path.dirname(nvcc), name)
    if os.path.exists(beside):
        return beside
    try:  # Triton ships cuobjdump with its NVIDIA backend
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return bundled if os.path.exists(bundled) else None
    except ImportError:
        return None


def compile_source(nvcc: str, source: str, outdir: str) -> tuple[str, dict[str, dict]]:
    """The cubin of csrc/cuda/<source> for sm_90, and ptxas' registers/stack/spills per mangled name."""
    cubin = os.path.join(outdir, source.replace(".cu", ".cubin"))
    result = subprocess.run(
        [nvcc, *NVCC_FLAGS, "-o", cubin, os.path.join(ROOT, "csrc", "cuda", source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"kernel_cost: nvcc failed on {source}:\n{result.stderr}")
    info: dict[str, dict] = {}
    current = None
    for line in result.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_90'", line):
            current = info.setdefault(m.group(1), {})
        elif current is not None and (
            m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                r"(\d+) bytes spill loads",
                line,
            )
        ):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return cubin, info


INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_functions(cuobjdump: str, cubin: str) -> dict[str, list[tuple[int, str]]]:
    """Mangled name -> [(address, instruction text)] from cuobjdump -sass."""
    text = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            current = functions.setdefault(m.group(1), [])
        elif current is not None and (m := INSTRUCTION.match(line)):
            current.append((int(m.group(1), 16), m.group(2).strip()))
    return functions


BRANCH = re.compile(
    r"^(@!?U?P\w+\s+)?BRA(\.DIV)?(?:\.\w+)*\s+(?:!?U?P\w+,\s*|U?R\d+,\s*)?"
    r"(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)"
)
STOP = re.compile(r"^(EXIT|RET|BRA\s+(0x|`))")  # unpredicated: no fall-through


def control_flow(body: list[tuple[int, str]]):
    """Basic blocks (start -> addresses) and successors. Not followed: CALL (the subroutines after the kernel: slow
    paths of 64-bit division, IEEE division and sqrt out of the fast path's range) and BRA.DIV (the fallback
    for a warp that is not converged at a shuffle; never taken by a converged warp)."""
    addresses = [a for a, _ in body]
    leaders = {addresses[0]}
    for i, (_, t) in enumerate(body):
        if m := BRANCH.match(t):
            leaders.add(int(m.group(3), 16))
        if (BRANCH.match(t) or re.match(r"(@!?P\w+\s+)?(EXIT|RET)", t)) and i + 1 < len(body):
            leaders.add(addresses[i + 1])
    starts = sorted(a for a in leaders if a in set(addresses))
    position = {a: i for i, a in enumerate(addresses)}
    text = dict(body)
    blocks, successors = {}, {}
    for n, s in enumerate(starts):
        end = position[starts[n + 1]] if n + 1 < len(starts) else len(addresses)
        blocks[s] = addresses[position[s] : end]
        last = text[blocks[s][-1]]
        succ = []
        m = BRANCH.match(last)
        if m and not m.group(2):
            succ.append(int(m.group(3), 16))
        if not STOP.match(last) and n + 1 < len(starts):
            succ.append(starts[n + 1])
        successors[s] = [x for x in succ if x in position]
    reachable, stack = {starts[0]}, [starts[0]]
    while stack:
        for x in successors[stack.pop()]:
            if x not in reachable:
                reachable.add(x)
                stack.append(x)
    blocks = {s: b for s, b in blocks.items() if s in reachable}
    successors = {s: successors[s] for s in blocks}
    return blocks, successors


def natural_loops(blocks, successors) -> list[tuple[int, set[int]]]:
    """(header, addresses of the body) of each natural loop: back edges u -> v where v dominates u."""
    starts = sorted(blocks)
    predecessors = {s: [p for p in starts if s in successors[p]] for s in starts}
    dom = {s: set(starts) for s in starts}
    dom[starts[0]] = {starts[0]}
    changed = True
    while changed:
        changed = False
        for s in starts[1:]:
            new = {s} | set.intersection(*(dom[p] for p in predecessors[s]))
            if new != dom[s]:
                dom[s], changed = new, True
    loops: dict[int, set[int]] = {}
    for u in starts:
        for v in successors[u]:
            if v in dom[u]:
                members, stack = {v, u}, ([u] if u != v else [])
                while stack:
                    for p in predecessors[stack.pop()]:
                        if p not in members:
                            members.add(p)
                            stack.append(p)
                loops.setdefault(v, set()).update(members)
    return [(h, {a for b in loops[h] for a in blocks[b]}) for h in sorted(loops)]


def executions(kernel: Kernel, instructions: list[tuple[int, str]]) -> dict[int, float]:
    """address -> how often each warp issues it: once for straight code, times the trips of every loop around it."""
    blocks, successors = control_flow([(a, t) for a, t in instructions if not t.startswith("NOP")])
    loops = natural_loops(blocks, successors)
    if len(loops) != len(kernel.trips):
        found = ", ".join(f"{h:#x} ({len(m)} instructions)" for h, m in loops)
        sys.exit(
            f"kernel_cost: {kernel.version} {kernel.name}: expected {len(kernel.trips)} loops, SASS has "
            f"{len(loops)}: {found or 'none'}; update its trips"
        )
    counts = {}
    for members in blocks.values():
        for address in members:
            count = 1
            for (_, body), trips in zip(loops, kernel.trips):
                if address in body:
                    count *= trips
            counts[address] = count
    return counts


def warp_instructions(kernel: Kernel, instructions: list[tuple[int, str]]) -> tuple[int, int]:
    """(static instruction count, warp-instructions issued per warp)."""
    counts = executions(kernel, instructions)
    return len(counts), sum(counts.values())


# ---- the model: issue, bandwidth with latency, and the slower units, per machine ------------------------------


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    sms: int
    clock: float  # Hz, boost
    bandwidth: float  # bytes/s of DRAM, attainable
    latency: float  # s: a DRAM load's round trip under load (an assumption: --latency-ns)
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    warps_per_sm: int = 64
    blocks_per_sm: int = 32


MACHINES = [Machine("H100", 132, 1.75e9, 3.0e12, 550e-9), Machine("H200", 132, 1.98e9, 4.8e12, 550e-9)]
# warp-instructions per clock and SM of the slower units on sm_90: MUFU 16 lanes, SHFL 32 lanes, shared memory one
# 128-byte wavefront (an LDS.128 of 32 lanes is 4 of them; a broadcast is counted as if it were not)
UNIT_RATES = {"MUFU": 0.5, "SHFL": 1.0, "LDS": 1.0}
ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclasses.dataclass
class Profile:
    static: int  # instructions in the SASS (reachable)
    per_warp: float  # warp-instructions each warp issues
    units: dict[str, float]  # per warp: MUFU and SHFL instructions, shared-memory wavefronts (LDS)
    requested: float  # global-load bytes each thread requests (every LDG: halo rows re-read included)
    in_flight: int  # global-load bytes a thread has outstanding at most: loads issued before their first use


def access_bytes(text: str) -> int:
    for suffix in text.split()[0].split(".")[1:]:
        if suffix in ACCESS_BYTES:
            return ACCESS_BYTES[suffix]
    return 4


def profile(kernel: Kernel, instructions: list[tuple[int, str]]) -> Profile:
    """The kernel's warp-instructions, its slower units' work and its global loads, from the SASS: each instruction
    counted as often as a warp issues it (executions). Loads in flight: a scan in address order that keeps each LDG
    outstanding until an instruction reads one of its registers (or overwrites them), the most bytes outstanding at
    once being what a thread keeps in flight (the compiler's hoisting, as scheduled)."""
    counts = executions(kernel, instructions)
    text = dict(instructions)
    units = {"MUFU": 0.0, "SHFL": 0.0, "LDS": 0.0}
    requested = 0.0
    pending: dict[int, int] = {}  # register -> the load writing it
    outstanding: dict[int, int] = {}  # load -> bytes
    peak = 0
    for address in sorted(counts):
        line = re.sub(r"^@!?U?P\w+\s+", "", text[address])
        opcode = line.split()[0].split(".")[0]
        operands = line[len(line.split()[0]) :]
        registers = [int(r) for r in re.findall(r"\bR(\d+)\b", operands)]
        stores = opcode.startswith(("ST", "RED", "ATOM")) or opcode in ("BRA", "EXIT", "RET", "CALL")
        written = registers[:1] if registers and not stores and operands.strip().startswith("R") else []
        read = registers[len(written) :]
        for r in read + written:  # a use waits for the load; an overwrite ends it
            if r in pending:
                load = pending[r]
                for reg in [reg for reg, owner in pending.items() if owner == load]:
                    del pending[reg]
                outstanding.pop(load, None)
        if opcode in ("MUFU", "SHFL"):
            units[opcode] += counts[address]
        elif opcode == "LDS":
            units["LDS"] += counts[address] * max(1, access_bytes(line) // 4)
        elif opcode in ("LDG", "LD") and written:
            size = access_bytes(line)
            requested += counts[address] * size
            for reg in range(written[0], written[0] + max(1, size // 4)):
                pending[reg] = address
            outstanding[address] = size
            peak = max(peak, sum(outstanding.values()))
    return Profile(len(counts), sum(counts.values()), units, requested, peak)


@dataclasses.dataclass
class Estimate:
    ratio: float  # issue time at the whole GPU's rate / memory time at the bandwidth (the budget's measure)
    resident: float  # warps per busy SM
    sms: int  # SMs with work
    in_flight: float  # global-load bytes in flight per busy SM
    issue: float  # s
    memory: float  # s: the bytes at the bandwidth, or at what the loads in flight sustain (Little's law) if less
    units: float  # s: the busiest slower unit
    time: float  # s: the largest of the three, a lower bound on the kernel's time
    share: float  # the bandwidth's share the kernel can reach: (bytes / bandwidth) / time


def estimate(kernel: Kernel, prof: Profile, ptxas: dict, machine: Machine) -> Estimate:
    """The kernel's time on `machine`, bounded by issue (4 warp-instructions per clock on an SM holding 4 warps or
    more, one per warp otherwise), memory (bandwidth, or the bytes in flight over the latency: the launch geometry
    and occupancy give the warps, the SASS each one's loads in flight) and the slower units."""
    block = kernel.block_warps
    regs_per_warp = ceil_div(ptxas.get("registers", 255) * 32, 256) * 256
    by_regs = machine.regs_per_sm // (regs_per_warp * block)
    smem = ptxas.get("smem", 0)
    by_smem = machine.smem_per_sm // (smem + 1024) if smem else machine.blocks_per_sm
    occupancy = min(by_regs, by_smem, machine.warps_per_sm // block, machine.blocks_per_sm) * block
    sms = min(machine.sms, ceil_div(kernel.warps, block))
    resident = min(occupancy, kernel.warps / sms)
    total = prof.per_warp * kernel.warps
    issue = total / (sms * min(4.0, resident) * machine.clock)
    units = max(prof.units[u] * kernel.warps / UNIT_RATES[u] for u in UNIT_RATES) / (sms * machine.clock)
    in_flight = resident * prof.in_flight * 32
    rate = min(machine.bandwidth, sms * in_flight / machine.latency)
    memory = kernel.bytes / rate
    time = max(issue, memory, units)
    ratio = (total / (machine.sms * 4 * machine.clock)) / (kernel.bytes / machine.bandwidth)
    return Estimate(ratio, resident, sms, in_flight, issue, memory, units, time, kernel.bytes / machine.bandwidth / time)


def fmt_bytes(n):
    return f"{n / 1e6:.1f} MB"


SHAPES = [(B, L), (1, 128)]  # training at ConvBERT-base's benchmark shape; one sequence of inference
H200_RATIO_TARGET = 1.0  # at 4.8 TB/s: issue must at least not outlast memory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a v2 kernel is over budget or spills")
    parser.add_argument("--sass", metavar="DIR", help="keep the cubins and SASS listings in DIR")
    parser.add_argument("--version", choices=["v1", "v2"], help="only these kernels")
    parser.add_argument("--latency-ns", type=float, default=550, help="a DRAM load's round trip (default 550)")
    args = parser.parse_args(argv)
    machines = [dataclasses.replace(m, latency=args.latency_ns * 1e-9) for m in MACHINES]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("kernel_cost: nvcc not found; no table", file=sys.stderr)
        return 1
    cuobjdump = find_tool("cuobjdump", nvcc)
    if cuobjdump is None:
        print(
            "kernel_cost: cuobjdump not found (PATH, beside nvcc, or Triton's bundled one); no table", file=sys.stderr
        )
        return 1
    outdir = args.sass or tempfile.mkdtemp(prefix="kernel_cost_")
    os.makedirs(outdir, exist_ok=True)
    compiled = {}
    for source in sorted({k.source for k in KERNELS}):
        cubin, info = compile_source(nvcc, source, outdir)
        compiled[source] = (info, sass_functions(cuobjdump, cubin))
        if args.sass:
            with open(os.path.join(outdir, source.replace(".cu", ".sass")), "w") as f:
                subprocess.run([cuobjdump, "-sass", cubin], stdout=f, check=True)

    def function(kernel):
        info, functions = compiled[kernel.source]
        names = [n for n in functions if re.search(kernel.symbol, n)]
        if len(names) != 1:
            sys.exit(f"kernel_cost: {kernel.symbol} matches {len(names)} functions in {kernel.source}: {names}")
        return info.get(names[0], {}), functions[names[0]]

    print(
        "sm_90 SASS; ratio: issue time at 4 warp-instructions per clock on every SM over memory time at the "
        "bandwidth;\ntime: the largest of issue (on the SMs with work, one instruction per clock per warp below 4), "
        "memory (the bandwidth,\nor the loads in flight over a latency of "
        f"{args.latency_ns:.0f} ns if they sustain less) and the slower units (MUFU, SHFL, shared-memory\n"
        "wavefronts); share: the bandwidth's share that time leaves. "
        + ", ".join(f"{m.name}: {m.sms} SMs, {m.clock / 1e9:.2f} GHz, {m.bandwidth / 1e12:.1f} TB/s" for m in machines)
    )
    failures = []
    for batch, seq_len in SHAPES:
        kernels = [k for k in cuda_kernels(batch, seq_len) if args.version in (None, k.version)]
        header = (
            f"{'kernel':<30}{'ver':<4}{'bytes':>9}{'warps':>8}{'SASS':>6}{'warp-ins':>10}{'res':>5}{'KB/SM':>7}"
            f"{'ld MB':>7}"
            + "".join(f"{'|' + m.name:>7}{'ratio':>6}{'time us':>8}{'share':>6}" for m in machines)
            + f"{'regs':>6}{'spill':>6}  loops (trips per warp)"
        )
        print(
            f"\nConvBERT-base bf16, B={batch}, L={seq_len}, H={H}, D={D}, K={K}, C={C}; res: warps resident per busy "
            "SM; KB/SM: global loads in flight on one; ld MB: global loads requested (halo rows re-read included)"
        )
        print(header)
        print("-" * len(header))
        for kernel in kernels:
            ptxas, instructions = function(kernel)
            prof = profile(kernel, instructions)
            estimates = [estimate(kernel, prof, ptxas, m) for m in machines]
            spills = ptxas.get("spill_stores", 0) + ptxas.get("spill_loads", 0)
            first = estimates[0]
            print(
                f"{kernel.name:<30}{kernel.version:<4}{fmt_bytes(kernel.bytes):>9}{kernel.warps:>8}{prof.static:>6}"
                f"{prof.per_warp * kernel.warps / 1e6:>9.2f}M{first.resident:>5.1f}{first.in_flight / 1024:>7.1f}"
                f"{prof.requested * 32 * kernel.warps / 1e6:>7.1f}"
                + "".join(f"{'|':>7}{e.ratio:>6.2f}{e.time * 1e6:>8.1f}{e.share:>6.2f}" for e in estimates)
                + f"{ptxas.get('registers', -1):>6}{spills:>6}  {[round(t, 3) for t in kernel.trips] or '-'} "
                f"{kernel.note}"
            )
            over = (batch, seq_len) == (B, L) and kernel.version == "v2"
            if over and (estimates[0].ratio > RATIO_TARGET or estimates[1].ratio > H200_RATIO_TARGET):
                failures.append(
                    f"{kernel.name}: ratio {estimates[0].ratio:.2f} on H100 (budget {RATIO_TARGET}), "
                    f"{estimates[1].ratio:.2f} on H200 (budget {H200_RATIO_TARGET})"
                )
            if kernel.version == "v2" and (spills or ptxas.get("stack", 0)):
                failures.append(f"{kernel.name}: spills {spills} B, stack {ptxas.get('stack')} B")
    if failures:
        print("over budget:", *failures, sep="\n  ")
    if args.version is None:
        triton_table(cuobjdump, outdir)  # the Triton kernels' rows (their own section below)
    return 1 if failures and args.check else 0


# ======================================================================================================================
# The Triton kernels (issue 23: packed sequences). Kept apart from the CUDA rows above, which others maintain.
#
# The same shape and terms, from Triton's own sm_90 cubins: each launch of convbert_fast/ops/triton/ at ConvBERT-base
# bf16 is recorded and specialised as tools/triton_aot_check.py does (the autotuned separable forward in its first
# config), compiled with triton.compile for GPUTarget("cuda", 90, 32) and listed with cuobjdump -sass. Warps: the
# launch's grid times its num_warps; a Triton program's warps all run the same instruction stream. `tr`: the B rows
# as they are; `tr+cu`: the same B*L tokens as B sequences packed into one row with cu_seqlens, where each row's
# sequence is found by a binary search of ceil(log2 B) steps, unrolled (no loop more): the difference between the
# two rows is what the sequence boundaries cost.
# ======================================================================================================================

# (row name, the jit function, its loops' trips per warp from the launch's constants, bytes (or a function of those
# constants), note)
TRITON_KERNELS = [
    (
        "span conv fwd",
        "_span_conv_fwd_kernel",
        lambda kw: [ceil_div(D, kw["BLOCK_D"])],
        BF16 * (2 * ROWS * W + ROWS * H * K),
        "loop: D / BLOCK_D channel steps; taps unrolled",
    ),
    (
        "span conv bwd: logits",
        "_span_conv_grad_logits_kernel",
        lambda kw: [ceil_div(D, kw["BLOCK_D"])],
        BF16 * (2 * ROWS * W + 2 * ROWS * H * K) + FP32 * ROWS * H * K,
        "loop: D / BLOCK_D; writes the fp32 weights",
    ),
    (
        "span conv bwd: values",
        "_span_conv_grad_values_kernel",
        lambda kw: [ceil_div(D, kw["BLOCK_D"])],
        BF16 * 2 * ROWS * W + FP32 * ROWS * H * K,
        "loop: D / BLOCK_D; reads the fp32 weights",
    ),
    (
        "separable fwd * query",
        "_separable_fwd_kernel",
        lambda kw: [ceil_div(C, kw["BLOCK_K"]), K],
        BF16 * (ROWS * C + 2 * ROWS * W + W * C + K * C + W),
        "loops: C / BLOCK_K, taps; depthwise + GEMM + bias * query",
    ),
    (
        "depthwise (bwd)",
        "_depthwise_kernel",
        lambda kw: [],
        BF16 * 2 * ROWS * C,
        "taps unrolled; twice per backward",
    ),
    (
        "depthwise weight grad",
        "_tap_grad_kernel",
        lambda kw: [],
        lambda kw: BF16 * 2 * ROWS * C + FP32 * ceil_div(ROWS, kw["BLOCK_M"]) * K * C,
        "taps unrolled; fp32 partials per BLOCK_M rows",
    ),
]


def triton_launches():
    """(tools/triton_aot_check as a module, {(jit function name, packed): (jit function, args, kwargs with the
    config's constants, programs)}) of the two convs' launches (forward with the query, backward) at the shape
    above, recorded, not run."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton_aot_check as aot  # noqa: I001 first: it sets the GPU code path's environment for convbert_fast
    import torch
    from triton.runtime.autotuner import Autotuner

    log, context, op = aot.recorder()
    for packed in (False, True):
        context["packed"] = packed
        rows = (1, ROWS) if packed else (B, L)
        cu = torch.arange(0, ROWS + 1, L, dtype=torch.int32) if packed else None  # B sequences of L tokens

        def empty(*shape):
            return torch.empty(*shape, dtype=torch.bfloat16)

        values, logits, x, query = empty(*rows, W), empty(*rows, H * K), empty(*rows, C), empty(*rows, W)
        depthwise, pointwise, bias = empty(C, 1, K), empty(W, C, 1), empty(W)
        op["dynamic_span_conv_triton_op"](values, logits, H, cu)
        op["dynamic_span_conv_backward_triton_op"](values, values, logits, H, cu)
        op["separable_conv1d_mul_triton_op"](x, depthwise, pointwise, bias, query, cu)
        op["separable_conv1d_backward_triton_op"](query, x, depthwise, pointwise, bias, cu)
    launches = {}
    for kernel, args, kwargs, labels in log:
        fn, config = (kernel.fn, kernel.configs[0].all_kwargs()) if isinstance(kernel, Autotuner) else (kernel, {})
        full = {**kwargs, **config}
        grid = labels["grid"](full) if callable(labels["grid"]) else labels["grid"]
        launches.setdefault((fn.__name__, labels["packed"]), (fn, args, full, math.prod(grid)))
    return aot, launches


def triton_table(cuobjdump: str, outdir: str) -> None:
    """The Triton rows: printed for the record, not judged by --check (the AOT check fails on their spills)."""
    try:
        import triton
    except ImportError as error:
        print(f"kernel_cost: no Triton rows ({error})")
        return
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel_cost_triton_")  # ptxas runs: its -v log
    aot, launches = triton_launches()
    header = (
        f"{'kernel':<24}{'ver':<6}{'bytes':>10}{'mem us':>8}{'SASS':>7}{'warp-ins':>11}{'issue us':>10}"
        f"{'ratio':>7}{'regs':>6}{'spill':>7}  loops (trips per warp)"
    )
    print(f"\nTriton {triton.__version__}, the same shape; tr+cu: {B} sequences of {L} packed with cu_seqlens")
    print(header)
    print("-" * len(header))
    for name, function, trips_of, moved_of, note in TRITON_KERNELS:
        for packed in (False, True):
            fn, args, kwargs, programs = launches[(function, packed)]
            signature, constexprs, attrs, options = aot.specialise(fn, args, kwargs, 90)
            compiled, log = aot.compile_logged(fn, signature, constexprs, attrs, options.__dict__, 90)
            cubin = os.path.join(outdir, f"{function}{'_packed' if packed else ''}.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            (instructions,) = sass_functions(cuobjdump, cubin).values()
            trips, moved = trips_of(kwargs), moved_of(kwargs) if callable(moved_of) else moved_of
            version = "tr+cu" if packed else "tr"
            kernel = Kernel(name, version, "triton", function, programs * compiled.metadata.num_warps, trips, moved)
            static, per_warp = warp_instructions(kernel, instructions)
            issue_s, memory_s = per_warp * kernel.warps / ISSUE_RATE, moved / BANDWIDTH
            ptxas = aot.ptxas_figures(log) or {}
            spills = ptxas.get("spill_stores", -1) + ptxas.get("spill_loads", 0)
            print(
                f"{name:<24}{version:<6}{fmt_bytes(moved):>10}{memory_s * 1e6:>8.1f}{static:>7}"
                f"{per_warp * kernel.warps / 1e6:>10.2f}M{issue_s * 1e6:>10.1f}{issue_s / memory_s:>7.2f}"
                f"{ptxas.get('regs', -1):>6}{spills:>7}  {trips or '-'} {note}"
            )


if __name__ == "__main__":
    sys.exit(main())
