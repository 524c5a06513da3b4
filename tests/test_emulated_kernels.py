"""The CUDA kernels, compiled by g++ and run on the CPU against double-precision loops.

No GPU is needed: tests/emulation/tiled_kernels.cpp runs each block's threads as std::threads, a warp's lanes
meeting at every shuffle and __syncwarp. It checks the index math (tiles, halos, the register rings, vector and
scalar loads, 32-bit offsets, strided outputs and gradients), the reduce-scatter, the per-block partial sums and
the dropout mask against the documented splitmix64, for fp32, bf16, fp16 and fp64; the convs' tiled (v2) and general
(v1) kernels alike, on batch rows and on packed sequences (cu_seqlens: empty, 1-token, shorter and longer than K,
across tiles; a neighbour's NaN kept out; offsets that break every rule run without leaving the tensors). It also
catches what the barriers would hide: the lanes of a meeting must come from one call site (a planted divergent kernel
is reported), and under ThreadSanitizer a shared-memory read of another lane's write with no __syncwarp between is a
race (one planted away is reported; the real kernels have none). Every case also runs under AddressSanitizer and
UBSan (UB fatal). Three g++ builds (plain, TSan, ASan+UBSan): ~100 s in all on a loaded 2-core CI machine. The CUDA
tests check the real thing on a GPU."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_include() -> str | None:
    """CUDA's headers (cuda_bf16.h and friends): beside nvcc, or under CUDA_HOME."""
    candidates = []
    if nvcc := shutil.which("nvcc"):
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    candidates += [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"), "/usr/local/cuda/include"]
    return next((c for c in candidates if os.path.exists(os.path.join(c, "cuda_bf16.h"))), None)


SOURCE = os.path.join(ROOT, "tests", "emulation", "tiled_kernels.cpp")
BUILDS = {  # g++ flags of each build of the emulation
    "plain": ["-O1"],
    "address,undefined": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "thread": ["-O1", "-fsanitize=thread"],
}
# The planted missing __syncwarp: the tiled span conv forward's one __syncwarp, between the lanes' writes of their
# tokens' taps to shared memory and each half-warp's reads of 32 tokens' taps (csrc/cuda/dynamic_span_conv.cu).
PLANTED_KERNEL = "span_conv_forward_tiled_kernel"


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """emulation(build) -> the binary of that build (BUILDS), compiled once per module run (xdist: per worker)."""
    include = cuda_include()
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if include is None or compiler is None:
        pytest.skip(f"needs g++ and CUDA's headers (found compiler {compiler}, headers {include})")
    built = {}

    def build(name: str) -> str:
        if name not in built:
            binary = tmp_path_factory.mktemp("emulation") / f"tiled_kernels_{name.replace(',', '_')}"
            compiled = subprocess.run(
                [compiler, "-std=c++20", *BUILDS[name], "-pthread", f"-I{include}", SOURCE, "-o", str(binary)],
                check=False,
                capture_output=True,
                text=True,
            )
            assert compiled.returncode == 0, compiled.stderr[-5000:]
            built[name] = str(binary)
        return built[name]

    return build


def run(binary: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # without address-space randomisation where setarch can turn it off: GCC's ThreadSanitizer aborts with
    # "unexpected memory mapping" under the larger mmap randomisation of newer kernels
    fixed = [setarch, platform.machine(), "-R"] if (setarch := shutil.which("setarch")) else []
    return subprocess.run(
        [*fixed, binary, *args], check=False, capture_output=True, text=True, timeout=800,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.timeout(900)  # one g++ compile of every kernel instantiation and ~20 s of emulation
def test_tiled_kernels_match_double_precision_loops(emulation):
    result = run(emulation("plain"))
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failure(s)" in result.stdout
    assert "DIVERGENT" not in result.stdout


@pytest.mark.timeout(900)  # the plain build (shared with the test above when run in one process) and a 64-thread launch
def test_lanes_meeting_from_different_lines_are_reported(emulation):
    """A planted kernel whose lanes reach a shuffle, then a __syncwarp, from two lines each: both meetings are
    reported with both call sites, and the run fails."""
    result = run(emulation("plain"), "--planted-divergence")
    print(result.stdout)
    assert result.returncode != 0, result.stdout + result.stderr
    reports = [line for line in result.stdout.splitlines() if line.startswith("DIVERGENT: planted divergent kernel")]
    assert len(reports) == 4, result.stdout  # two warps, two divergent meetings each
    # each report names both sites: the shuffle's two lines, then the __syncwarp's two
    with open(SOURCE) as source:
        lines = source.read().splitlines()
    sites = sorted({tuple(int(n) for n in re.findall(r"tiled_kernels\.cpp:(\d+)", r)) for r in reports})
    assert len(sites) == 2 and all(len(pair) == 2 and pair[0] != pair[1] for pair in sites), reports
    for pair, call in zip(sites, ("__shfl_xor_sync(", "__syncwarp()")):
        assert all(call in lines[n - 1] for n in pair), (pair, [lines[n - 1] for n in pair])


@pytest.mark.timeout(900)  # a ThreadSanitizer build (~15 s idle) and one span conv case under it (~15 s), twice
def test_a_missing_syncwarp_is_a_data_race(emulation):
    """Built with ThreadSanitizer, one span conv case (v2 and v1, forward and backward): as it is, no race; with
    the tiled forward's __syncwarp planted away (--drop-syncwarp), its shared-memory taps written by one lane and
    read by another race, which TSan reports whatever the timing (the barriers are its only happens-before)."""
    binary = emulation("thread")
    clean = run(binary, "--one-case")
    print(clean.stdout, clean.stderr[-3000:])
    assert clean.returncode == 0 and "ThreadSanitizer" not in clean.stderr, clean.stdout + clean.stderr[-5000:]
    assert "0 failure(s)" in clean.stdout
    planted = run(binary, "--one-case", "--drop-syncwarp", PLANTED_KERNEL, env={"TSAN_OPTIONS": "halt_on_error=1"})
    print(planted.stderr[-3000:])
    assert planted.returncode != 0, planted.stdout + planted.stderr[-5000:]
    assert "WARNING: ThreadSanitizer: data race" in planted.stderr, planted.stderr[-5000:]
    report = planted.stderr[planted.stderr.index("WARNING: ThreadSanitizer") :]
    assert f"{PLANTED_KERNEL}<" in report and "taps_smem" in report, report[:5000]


@pytest.mark.timeout(900)  # an AddressSanitizer + UBSan build (~30 s idle) and every case under it (~20 s)
def test_kernels_under_address_and_undefined_behaviour_sanitizers(emulation):
    """Every case, built with AddressSanitizer and UBSan, undefined behaviour fatal: no read or write outside a
    tensor (the buffers are sized exactly), no leak, no UB, for every input the cases run (bad offsets included)."""
    result = run(emulation("address,undefined"))
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert "0 failure(s)" in result.stdout
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr, result.stderr[-5000:]
