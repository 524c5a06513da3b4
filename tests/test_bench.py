"""`python -m convbert_fast bench` as a user runs it: a table, a JSON record and a PNG; clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "convbert_fast", "bench", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.timeout(300)  # a benchmark run in a child process, compile included: 65 s on a loaded 2-core AMD EPYC
def test_bench_writes_table_json_and_plot(tmp_path):
    record_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = bench(
        "--config", "small", "--layers", "1", "--batch-size", "1", "--seq-len", "8", "16", "--repeats", "1",
        "--warmup", "0", "--providers", "transformers,eager,cpp,triton",
        "--json", str(record_path), "--plot", str(plot_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "train x eager" in result.stdout and "span conv fwd+bwd at base shapes" in result.stdout
    if not torch.cuda.is_available():  # a provider that cannot run here is skipped with its reason
        assert re.search(r"triton\s+skipped: Triton", result.stdout)
    record = json.loads(record_path.read_text())
    for key in ("device", "versions", "date", "git_commit", "measurements", "summary"):
        assert key in record
    assert set(record["versions"]) == {"python", "torch", "triton", "transformers", "cuda", "driver"}
    summary = record["summary"]
    for key in ("train_step_vs_eager", "train_step_vs_compile", "inference_vs_eager", "peak_memory_vs_eager",
                "span_conv_vs_eager", "span_conv_bandwidth_fraction"):  # fmt: skip
        assert key in summary
    assert summary["train_step_vs_eager"] > 0 and summary["span_conv_vs_eager"] > 0
    assert summary["train_step_vs_compile"] is None  # transformers-compile was not asked for
    measured = [m for m in record["measurements"] if m["skipped"] is None]
    assert {(m["provider"], m["seq_len"]) for m in measured} >= {("transformers", 8), ("cpp", 16)}
    assert all(m["train_step_ms"] > 0 and m["forward_ms"] > 0 for m in measured)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)  # several child processes, each importing torch and transformers: 40 s loaded
def test_bench_rejects_unknown_provider_config_and_device():
    result = bench("--providers", "transformers,fastest")
    assert (
        result.returncode == 2
        and "unknown provider(s) ['fastest']; valid: transformers, transformers-compile" in result.stderr
    )
    result = bench("--config", "large")
    assert result.returncode == 2 and "invalid choice: 'large'" in result.stderr
    if not torch.cuda.is_available():
        result = bench("--device", "cuda")
        assert result.returncode == 2 and "--device 'cuda' is not available here; valid: cpu" in result.stderr


@pytest.mark.timeout(300)  # profiles three models in a child process: 24 s loaded
def test_breakdown_sums_every_category_for_each_model(tmp_path):
    """benchmarks/breakdown.py (the README's "Where the time goes") runs and accounts for the whole step."""
    record_path = tmp_path / "breakdown.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/breakdown.py", "--device", "cpu", "--layers", "1", "--batch-size", "1",
         "--seq-len", "16", "--json", str(record_path)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads(record_path.read_text())
    assert set(record["breakdown_ms"]) == {"transformers", "ours (eager)", "ours (auto)"}
    for categories in record["breakdown_ms"].values():
        assert categories["GEMM (linear, matmul)"] > 0 and sum(categories.values()) > 0
    assert record["breakdown_ms"]["ours (auto)"].get("span conv", 0) > 0  # our op is counted as the span conv
    assert "| total |" in result.stdout and record["device"] and record["date"]
