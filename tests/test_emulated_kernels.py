"""The CUDA kernels, compiled by g++ and run on the CPU against double-precision loops.

No GPU is needed: tests/emulation/tiled_kernels.cpp runs each block's threads as std::threads, a warp's lanes
meeting at every shuffle and __syncwarp. It checks the index math (tiles, halos, the register rings, vector and
scalar loads, 32-bit offsets, strided outputs and gradients), the reduce-scatter, the per-block partial sums and
the dropout mask against the documented splitmix64, for fp32, bf16, fp16 and fp64; the convs' tiled (v2) and general
(v1) kernels alike, on batch rows and on packed sequences (cu_seqlens: empty, 1-token, shorter and longer than K,
across tiles; a neighbour's NaN kept out; offsets that break every rule run without leaving the tensors). The CUDA
tests check the real thing on a GPU."""

from __future__ import annotations

import os
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


@pytest.mark.timeout(900)  # one g++ compile of every kernel instantiation (~1 min) and ~0.5 min of emulation
def test_tiled_kernels_match_double_precision_loops(tmp_path):
    include = cuda_include()
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if include is None or compiler is None:
        pytest.skip(f"needs g++ and CUDA's headers (found compiler {compiler}, headers {include})")
    binary = tmp_path / "tiled_kernels"
    source = os.path.join(ROOT, "tests", "emulation", "tiled_kernels.cpp")
    subprocess.run(
        [compiler, "-std=c++20", "-O1", "-pthread", f"-I{include}", source, "-o", str(binary)],
        check=True,
        capture_output=True,
        text=True,
    )
    result = subprocess.run([str(binary)], check=False, capture_output=True, text=True, timeout=800)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failure(s)" in result.stdout
