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


def ceil_div(a, b):
    return -(-a // b)


SPAN_TILES = B * H * ceil_div(L, 64)  # v2: one warp per (batch, head, 64 tokens)
LN_ROWS_PER_WARP = 4  # v2 LayerNorm forward (csrc/cuda/dropout_add_layer_norm.cu)
LN_BACKWARD_ROWS_PER_WARP = 8  # v2 LayerNorm backward
LN_PARTIAL_ROWS = 4 * LN_BACKWARD_ROWS_PER_WARP  # rows per block of partial sums
DW_TILE = 32  # v2 depthwise: tokens per thread
DW_WG_TILE = 128  # v2 depthwise weight gradient: tokens per chunk

KERNELS = [
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

# Packed sequences (cu_seqlens, issue 23): the same B x L tokens as one row of B sequences of L (T = 16384), run by
# each conv kernel's packed instantiation (symbol ...Lb1E; the same bytes, warps and loops, plus these). SEARCH: the
# iterations of the binary search over the B + 1 offsets that finds a token's sequence (common.cuh: sequence_of).
SEARCH = math.ceil(math.log2(B))
V1_WG_CHUNK = 64  # v1 depthwise weight gradient: rows per chunk; a search at its first row and at each boundary
PACKED = {  # (version, name): (trips, note)
    ("v1", "span conv fwd"): ([SEARCH, 2], "+ a search per warp"),
    ("v1", "span conv bwd: logits"): ([SEARCH, K, 2], "+ a search per warp"),
    ("v1", "span conv bwd: values"): ([SEARCH, 2, K], "+ a search per warp"),
    ("v1", "depthwise fwd"): ([0, 1, SEARCH], "the loop's one-sequence copy not run; a search per element"),
    (
        "v1",
        "depthwise weight grad",
    ): (
        [0, 0, 0, K, 0, V1_WG_CHUNK, (1 + V1_WG_CHUNK / L) * SEARCH / V1_WG_CHUNK],
        "per tap: the rows' walk (its one-sequence copy not run), a search where it leaves a sequence",
    ),
    ("v2", "span conv fwd"): ([SEARCH, SEARCH], "+ a search per token (2 rounds), a predicate per tap"),
    ("v2", "span conv bwd"): ([3, SEARCH, SEARCH], "+ a search per token (2 rounds), zeroed weights for d(values)"),
    ("v2", "depthwise fwd"): ([SEARCH], "+ a search per lane's token, a shuffle per token, a predicate per tap"),
    ("v2", "depthwise weight grad"): (
        [SEARCH] * 4 + [ceil_div(DW_WG_TILE, K)],
        "+ 4 searches per lane into shared memory, a predicate per tap",
    ),
}


def with_packed(kernels: list[Kernel]) -> list[Kernel]:
    """Each conv kernel followed by its packed instantiation."""
    rows = []
    for kernel in kernels:
        rows.append(kernel)
        if (kernel.version, kernel.name) in PACKED:
            trips, note = PACKED[kernel.version, kernel.name]
            assert kernel.symbol.endswith("Lb0E"), kernel.symbol
            packed_symbol = kernel.symbol[: -len("Lb0E")] + "Lb1E"
            rows.append(dataclasses.replace(kernel, name=kernel.name + " packed", symbol=packed_symbol, trips=trips,
                                            note=note))
    return rows


KERNELS = with_packed(KERNELS)


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


def warp_instructions(kernel: Kernel, instructions: list[tuple[int, str]]) -> tuple[int, int]:
    """(static instruction count, warp-instructions issued per warp)."""
    blocks, successors = control_flow([(a, t) for a, t in instructions if not t.startswith("NOP")])
    loops = natural_loops(blocks, successors)
    if len(loops) != len(kernel.trips):
        found = ", ".join(f"{h:#x} ({len(m)} instructions)" for h, m in loops)
        sys.exit(
            f"kernel_cost: {kernel.version} {kernel.name}: expected {len(kernel.trips)} loops, SASS has "
            f"{len(loops)}: {found or 'none'}; update its trips"
        )
    static = per_warp = 0
    for members in blocks.values():
        for address in members:
            executions = 1
            for (_, body), trips in zip(loops, kernel.trips):
                if address in body:
                    executions *= trips
            static += 1
            per_warp += executions
    return static, per_warp


def fmt_bytes(n):
    return f"{n / 1e6:.1f} MB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a v2 kernel is over the ratio or spills")
    parser.add_argument("--sass", metavar="DIR", help="keep the cubins and SASS listings in DIR")
    parser.add_argument("--version", choices=["v1", "v2"], help="only these kernels")
    args = parser.parse_args(argv)
    kernels = [k for k in KERNELS if args.version in (None, k.version)]
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
    for source in sorted({k.source for k in kernels}):
        cubin, info = compile_source(nvcc, source, outdir)
        compiled[source] = (info, sass_functions(cuobjdump, cubin))
        if args.sass:
            with open(os.path.join(outdir, source.replace(".cu", ".sass")), "w") as f:
                subprocess.run([cuobjdump, "-sass", cubin], stdout=f, check=True)

    header = (
        f"{'kernel':<30}{'ver':<5}{'bytes':>10}{'mem us':>8}{'SASS':>7}{'warp-ins':>11}{'issue us':>10}"
        f"{'ratio':>7}{'regs':>6}{'spill':>7}  loops (trips per warp)"
    )
    print(
        f"ConvBERT-base bf16, B={B}, L={L}, H={H}, D={D}, K={K}, C={C}; sm_90 SASS; "
        f"{BANDWIDTH / 1e12:.1f} TB/s, {ISSUE_RATE / 1e12:.3f} T warp-instructions/s"
    )
    print(header)
    print("-" * len(header))
    failures = []
    for kernel in kernels:
        info, functions = compiled[kernel.source]
        names = [n for n in functions if re.search(kernel.symbol, n)]
        if len(names) != 1:
            sys.exit(f"kernel_cost: {kernel.symbol} matches {len(names)} functions in {kernel.source}: {names}")
        name = names[0]
        static, per_warp = warp_instructions(kernel, functions[name])
        total = per_warp * kernel.warps
        issue_s, memory_s = total / ISSUE_RATE, kernel.bytes / BANDWIDTH
        ratio = issue_s / memory_s
        ptxas = info.get(name, {})
        spills = ptxas.get("spill_stores", 0) + ptxas.get("spill_loads", 0)
        print(
            f"{kernel.name:<30}{kernel.version:<5}{fmt_bytes(kernel.bytes):>10}{memory_s * 1e6:>8.1f}{static:>7}"
            f"{total / 1e6:>10.2f}M{issue_s * 1e6:>10.1f}{ratio:>7.2f}{ptxas.get('registers', -1):>6}"
            f"{spills:>7}  {[round(t, 3) for t in kernel.trips] or '-'} {kernel.note}"
        )
        if kernel.version == "v2" and (ratio > RATIO_TARGET or spills or ptxas.get("stack", 0)):
            failures.append(f"{kernel.name}: ratio {ratio:.2f}, spills {spills} B, stack {ptxas.get('stack')} B")
    if failures:
        print(f"over budget (ratio > {RATIO_TARGET} or spills):", *failures, sep="\n  ")
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
