"""Shared fixtures: small configs shaped like the released ones, and a record of parity differences."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (read when convbert_fast defines them), unless
# TRITON_INTERPRET=0 is set explicitly, as a GPU machine leaves it: then the Triton-on-CPU cases skip (below).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

import convbert_fast as cf  # noqa: E402


def unless_runs(backend_name: str, device: str):
    """A mark that skips the test, with the reason, where `backend_name` cannot run on `device` with these
    versions: torch 2.11's wrap_triton refuses Triton's interpreted kernels, triton < 3.9's interpreter fails
    on numpy 2.4, and on a GPU machine the interpreter is off."""
    gap = cf.ops.backend.device_gaps().get((backend_name, device))
    return pytest.mark.skipif(gap is not None, reason=f"{backend_name} on {device}: {gap}")


NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
# Marks every test case that runs Triton kernels on CPU tensors: they skip, at collection and with the reason, where
# they cannot run (the interpreter is off: a GPU machine, or TRITON_INTERPRET=0; or these versions' interpreter
# fails), instead of failing with "backend 'triton' cannot run on cpu".
TRITON_ON_CPU = unless_runs("triton", "cpu")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=NO_GPU)]
# Every backend on every device (Triton on the CPU: the interpreter, set above, where these versions run it)
BACKEND_DEVICES = [
    pytest.param(
        (name, device),
        id=f"{name}-{device}",
        marks=NO_GPU if device == "cuda" else TRITON_ON_CPU if name == "triton" else (),
    )
    for device in ("cpu", "cuda")
    for name in ("eager", "cpp", "triton")
]

# Two layers and a small vocabulary keep CI fast; widths, heads, groups and K are the released ones.
COMMON = dict(vocab_size=99, num_hidden_layers=2, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
PARITY_CONFIGS = {
    "base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, embedding_size=768),
    "medium-small": dict(
        hidden_size=384, num_attention_heads=8, intermediate_size=1536, embedding_size=128, num_groups=2
    ),
    "small": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, embedding_size=128),
    # head_ratio > num_attention_heads: transformers falls back to a single head of size hidden / 2
    "one-head": dict(hidden_size=64, num_attention_heads=2, head_ratio=4, intermediate_size=128, embedding_size=64),
    "small-k3": dict(
        hidden_size=256, num_attention_heads=4, intermediate_size=1024, embedding_size=128, conv_kernel_size=3
    ),
    "small-k5": dict(
        hidden_size=256, num_attention_heads=4, intermediate_size=1024, embedding_size=128, conv_kernel_size=5
    ),
}


def make_config(name: str, **overrides) -> cf.ConvBertConfig:
    return cf.ConvBertConfig(**{**COMMON, **PARITY_CONFIGS[name], **overrides})


_worst_parity: dict[str, float] = {}


def record_parity(label: str, diff: float) -> None:
    _worst_parity[label] = max(_worst_parity.get(label, 0.0), diff)


def pytest_terminal_summary(terminalreporter):
    if _worst_parity:
        terminalreporter.section("worst |ours - transformers| per class (fp32)")
        for label, diff in sorted(_worst_parity.items()):
            terminalreporter.write_line(f"{label:<56} {diff:.3e}")


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts on `auto` and leaves it there."""
    cf.set_backend("auto")
    yield
    cf.set_backend("auto")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    """(backend, device), with that backend chosen for the test."""
    name, device = request.param
    with cf.use_backend(name):
        yield name, device


@pytest.fixture(params=DEVICES)
def device_name(request):
    return request.param


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(samples, namespace, device):
    """torch.library's schema, fake-tensor, autograd-registration and AOT-dispatch checks on every (op, args) of
    `samples`. Triton's interpreter cannot run a kernel on the fake tensors of AOT dispatch, so for the Triton ops
    on the CPU that one check is left to the GPU run (tools/gpu_check.sh)."""
    utils = OPCHECK_UTILS
    if namespace == "convbert_fast_triton" and device == "cpu" and INTERPRETED:
        utils = OPCHECK_UTILS[:3]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=utils)


# Each op's opcheck test runs over both op namespaces (the cpp and triton backends' kernels) on every device
NAMESPACE_DEVICES = [
    pytest.param(
        namespace,
        device,
        id=f"{namespace}-{device}",
        marks=NO_GPU if device == "cuda" else TRITON_ON_CPU if namespace == "convbert_fast_triton" else (),
    )
    for device in ("cpu", "cuda")
    for namespace in ("convbert_fast", "convbert_fast_triton")
]
