"""Benchmark options. `--bench-size tiny` (CI's smoke run, with --benchmark-disable) shrinks every shape."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels can only run in Triton's interpreter: usable for the tiny smoke run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=["full", "tiny"], default="full", help="full shapes or a smoke test")
    parser.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.addoption(
        "--bench-dtype", choices=["fp32", "bf16"], default=None, help="the op benchmarks' dtype (default: bf16 on a "
        "GPU, fp32 on the CPU; the tiny run is always fp32)"
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny(request):
    return request.config.getoption("--bench-size") == "tiny"


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--bench-device"))


@pytest.fixture(scope="session")
def bench_dtype(request, device):
    name = request.config.getoption("--bench-dtype") or ("bf16" if device.type == "cuda" else "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """A run stopped (SIGINT: tools/gpu_check.sh's time limits) in the middle of a benchmark leaves it without
    rounds, and pytest-benchmark's JSON then fails on it (min() of nothing), losing every finished one: drop it
    before pytest-benchmark writes."""
    benchmarks = getattr(getattr(session.config, "_benchmarksession", None), "benchmarks", None)
    if benchmarks is not None:
        benchmarks[:] = [b for b in benchmarks if b.stats.data]
    yield
