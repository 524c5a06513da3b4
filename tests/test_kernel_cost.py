"""tools/kernel_cost.py's counting, on hand-written SASS listings (the table itself needs nvcc: CI prints it)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("kernel_cost", os.path.join(ROOT, "tools", "kernel_cost.py"))
kernel_cost = importlib.util.module_from_spec(spec)
sys.modules["kernel_cost"] = kernel_cost  # its dataclass looks itself up there
spec.loader.exec_module(kernel_cost)


def listing(*instructions):
    """[(address, text)] at 16-byte steps, as cuobjdump prints them."""
    return [(16 * i, text) for i, text in enumerate(instructions)]


# entry; an outer loop (0x10-0x80) holding an inner self-loop (0x30-0x40); a divergence fallback (BRA.DIV) and a
# CALL to a subroutine after EXIT, neither counted; the padding's self-branch
SASS = listing(
    "S2R R0, SR_TID.X",  # 0x00
    "MOV R1, RZ",  # 0x10  outer loop head
    "BRA.DIV UR4, 0xc0",  # 0x20  to the fallback: not followed
    "FFMA R2, R2, R2, R2",  # 0x30  inner loop head
    "@P0 BRA 0x30",  # 0x40  inner back edge
    "@P1 BRA 0x70",  # 0x50  a forward branch inside the outer loop
    "CALL.REL.NOINC 0xe0",  # 0x60  a subroutine: not followed
    "IADD3 R1, R1, 0x1, RZ",  # 0x70
    "@P2 BRA 0x10",  # 0x80  outer back edge
    "STG.E desc[UR4][R2.64], R1",  # 0x90
    "EXIT",  # 0xa0
    "NOP",  # 0xb0
    "SHFL.BFLY PT, R3, R3, 0x1, 0x1f",  # 0xc0  divergence fallback
    "BRA 0x30",  # 0xd0
    "MUFU.RCP R4, R4",  # 0xe0  subroutine
    "RET.REL.NODEC R10 0x0",  # 0xf0
    "BRA 0x100",  # 0x100 padding
)


def test_loops_are_found_by_their_back_edges_and_cold_paths_are_left_out():
    blocks, successors = kernel_cost.control_flow([(a, t) for a, t in SASS if not t.startswith("NOP")])
    counted = sorted(a for members in blocks.values() for a in members)
    assert counted == [16 * i for i in range(11)]  # entry .. EXIT; not the fallback, subroutine or padding
    loops = kernel_cost.natural_loops(blocks, successors)
    assert [(head, sorted(body)) for head, body in loops] == [
        (0x10, [0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80]),
        (0x30, [0x30, 0x40]),
    ]


@pytest.mark.parametrize("outer, inner", [(1, 1), (3, 5), (0, 7)])
def test_each_instruction_counts_once_per_iteration_of_every_loop_around_it(outer, inner):
    kernel = kernel_cost.Kernel("k", "v2", "k.cu", "k", warps=1, trips=[outer, inner], bytes=1)
    static, per_warp = kernel_cost.warp_instructions(kernel, SASS)
    # 0x00, 0x90, 0xa0 once; 0x10, 0x20, 0x50-0x80 (6) per outer iteration; 0x30, 0x40 per inner one of each
    assert static == 11
    assert per_warp == 3 + 6 * outer + 2 * outer * inner


def test_a_changed_loop_structure_stops_the_tool():
    kernel = kernel_cost.Kernel("k", "v2", "k.cu", "k", warps=1, trips=[4], bytes=1)
    with pytest.raises(SystemExit, match="expected 1 loops, SASS has 2"):
        kernel_cost.warp_instructions(kernel, SASS)
