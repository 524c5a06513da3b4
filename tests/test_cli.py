"""`python -m convbert_fast info | demo` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import transformers


def run(*args):
    return subprocess.run([sys.executable, "-m", "convbert_fast", *args], capture_output=True, text=True, timeout=300)


def test_info_reports_versions_device_and_backends():
    result = run("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"torch          {torch.__version__}" in out
    assert f"transformers   {transformers.__version__}" in out
    for line in ("python ", "triton ", "CUDA (torch) ", "device "):
        assert line in out
    assert "eager        ok" in out
    assert "cpp          ok" in out  # the extension is built by ./install.sh
    assert "triton       ok" in out
    assert "cpu packing    on (" in out  # this torch has MKL
    off = subprocess.run([sys.executable, "-m", "convbert_fast", "info"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CONVBERT_FAST_PACK_WEIGHTS": "0"})  # fmt: skip
    assert "cpu packing    off: CONVBERT_FAST_PACK_WEIGHTS=0" in off.stdout
    for value, problem in (("openblas", "CONVBERT_FAST_CPU_GEMM='openblas' is none of mkl, onednn"),
                           ("onednn", None)):  # fmt: skip
        env = {**os.environ, "CONVBERT_FAST_CPU_GEMM": value}
        info_there = subprocess.run([sys.executable, "-m", "convbert_fast", "info"], capture_output=True, text=True,
                                    timeout=300, env=env).stdout  # fmt: skip
        assert (f"cpu packing    off: {problem}" if problem else "packed by onednn, the faster") in info_there
    # a library that is not one: the first forward says so, naming the variable, instead of running unpacked
    forward = ("import torch, convbert_fast as cf; "
               "cf.ConvBertModel(cf.ConvBertConfig(num_hidden_layers=1))(torch.ones(1, 4).long())")  # fmt: skip
    bad = subprocess.run([sys.executable, "-c", forward], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CONVBERT_FAST_CPU_GEMM": "openblas"})  # fmt: skip
    assert bad.returncode != 0 and "ValueError: CONVBERT_FAST_CPU_GEMM='openblas' is none of mkl, onednn" in bad.stderr
    # a device a backend cannot serve comes with its reason (this torch is a CPU build, or a GPU is here)
    if torch.version.cuda is None:
        assert "but not on cuda: convbert_fast._C was built without CUDA kernels" in out


def test_demo_times_a_forward_and_a_training_step():
    result = run("demo", "--layers", "1", "--batch-size", "2", "--seq-len", "16", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "forward " in result.stdout and "forward+backward" in result.stdout
    assert result.stdout.count("tokens/s") == 2


def test_demo_rejects_an_unknown_config():
    result = run("demo", "--config", "huge")
    assert result.returncode == 2
    assert "invalid choice: 'huge'" in result.stderr


def test_demo_rejects_a_device_it_does_not_have():
    result = run("demo", "--device", "tpu")
    assert result.returncode == 2 and "valid devices are cpu, cuda" in result.stderr
    if not torch.cuda.is_available():
        result = run("demo", "--device", "cuda")
        assert result.returncode == 2 and "sees no CUDA device" in result.stderr
