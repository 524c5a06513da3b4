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


@pytest.fixture(scope="session")
def tiny(request):
    return request.config.getoption("--bench-size") == "tiny"


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--bench-device"))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """A run stopped (SIGINT: tools/gpu_check.sh's time limits) in the middle of a benchmark leaves it without
    rounds, and pytest-benchmark's JSON then fails on it (min() of nothing), losing every finished one: drop it
    before pytest-benchmark writes."""
    benchmarks = getattr(getattr(session.config, "_benchmarksession", None), "benchmarks", None)
    if benchmarks is not None:
        benchmarks[:] = [b for b in benchmarks if b.stats.data]
    yield
