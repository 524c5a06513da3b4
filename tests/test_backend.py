"""The backend API (choice, auto order, fallbacks and their warnings) and what crosses ops: torch.compile of a
block of them, full ConvBERT-base shapes. Each op's own tests are in tests/test_<op>.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from conftest import NO_GPU, TRITON_ON_CPU
from reference import (
    assert_within_torch_error,
    dynamic_span_conv_ref,
    grouped_linear_ref,
    separable_conv1d_ref,
)
from samples import DTYPES, double, grouped_inputs, norm_inputs, on, randn, separable_inputs, span_inputs

import convbert_fast as cf
from convbert_fast.ops import backend


@pytest.mark.parametrize(
    "backend_name,device",
    [
        ("cpp", "cpu"),
        pytest.param("cpp", "cuda", marks=NO_GPU),
        # Triton's interpreter cannot run under torch.compile's fake tensors: Triton is compiled on a GPU only
        pytest.param("triton", "cuda", marks=NO_GPU),
    ],
)
def test_torch_compile_fullgraph(backend_name, device, rng):
    """No graph break: the backend choice and the checks are traced; cpp ops are opaque nodes with fake rules,
    Triton ops are traced into their kernels."""
    x, dw, pw, bias = on(device, separable_inputs(2, 12, 8, 8, 9, gen=rng))
    logits_weight = (torch.randn(8, 2 * 9, generator=rng) * 0.3).to(device)
    g_weight, g_bias = on(device, grouped_inputs((1,), 2, 4, 8, gen=rng)[1:])

    def block(x, dw, pw, bias, logits_weight, g_weight, g_bias):
        key_conv = cf.ops.separable_conv1d(x, dw, pw, bias)
        mixed = cf.ops.dynamic_span_conv(key_conv, (key_conv * x) @ logits_weight, 2)
        return cf.ops.grouped_linear(mixed, g_weight, g_bias, activation="gelu")

    inputs = [t.requires_grad_() for t in (x, dw, pw, bias, logits_weight, g_weight, g_bias)]
    torch._dynamo.reset()
    with cf.use_backend(backend_name):
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(*inputs)
        grads = torch.autograd.grad(out.square().sum(), inputs)
    with cf.use_backend("eager"):
        ref = block(*inputs)
        ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- backend API --------------------------------------------------------------------------------------------------


def test_available_backends_reports_each_backend():
    status = cf.available_backends()
    assert status == {"eager": "ok", "cpp": "ok", "triton": "ok"}  # ./install.sh builds _C and installs triton


@pytest.mark.parametrize("setting,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_triton_fp32_dots_follow_torchs_matmul_precision(monkeypatch, setting, expected):
    """fp32 dots take TF32 exactly when torch's own fp32 matmuls do (torch.set_float32_matmul_precision); fp64
    stays IEEE and fp16/bf16 are unaffected. Checked on what the launchers pass to the kernels."""
    from convbert_fast.ops.triton import grouped_linear, separable_conv1d

    launches = []

    class Record:  # stands in for wrap_triton(kernel): kernel[grid](*args, **kwargs) is logged, not run
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    for module in (grouped_linear, separable_conv1d):
        monkeypatch.setattr(module, "wrap_triton", lambda kernel: Record())
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            grouped_linear.grouped_linear_triton_op(*grouped_inputs((2, 3), 2, 4, 4, dtype))
            separable_conv1d.separable_conv1d_triton_op(*separable_inputs(1, 5, 4, 4, 3, dtype))
    finally:
        torch.set_float32_matmul_precision(saved)
    assert [kw["DOT_PRECISION"] for kw in launches] == [expected] * 2 + ["ieee"] * 2 + ["tf32"] * 2


def test_triton_on_cpu_tensors_needs_the_interpreter():
    import subprocess
    import sys

    code = (
        "import torch, convbert_fast as cf\n"
        "cf.set_backend('triton')\n"
        "cf.ops.dynamic_span_conv(torch.randn(1, 4, 4), torch.randn(1, 4, 3), 1)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert (
        "backend 'triton' cannot run on cpu: Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        in result.stderr
    )


def test_triton_on_cpu_names_the_version_clash(monkeypatch):
    """triton < 3.9's interpreter fails on numpy >= 2.4: the backend refuses CPU tensors with that reason."""
    import numpy
    import triton

    import convbert_fast.ops.triton as triton_backend

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    assert "numpy < 2.4 or triton >= 3.9 work" in triton_backend.interpreter_gap()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    gap = triton_backend.interpreter_gap()  # what is left: torch 2.11's wrap_triton, or nothing
    assert gap is None or "wrap_triton" in gap


def _simulate_unavailable(monkeypatch, name, reason):
    monkeypatch.setattr(backend, "_unavailable_reason", {**backend._unavailable_reason, name: reason})


def test_auto_picks_cpp_on_cpu(rng):
    for op in backend.OP_NAMES:
        assert backend.implementation(op, torch.device("cpu")) is backend._implementations["cpp"][op]


@TRITON_ON_CPU  # chooses the triton backend for CPU tensors
def test_dropout_add_layer_norm_is_in_the_registry_and_runs_as_auto_where_a_backend_lacks_it(rng):
    """`triton` has no dropout_add_layer_norm: chosen, that op runs as under `auto` (cpp on the CPU), the others
    on Triton; `eager` gives the seed's math."""
    assert "dropout_add_layer_norm" in backend.OP_NAMES
    cpu = torch.device("cpu")
    with cf.use_backend("triton"):
        implementation = backend.implementation("dropout_add_layer_norm", cpu)
        assert implementation is backend._implementations["cpp"]["dropout_add_layer_norm"]
        assert backend.implementation("grouped_linear", cpu) is backend._implementations["triton"]["grouped_linear"]
    x, residual, weight, bias = norm_inputs((2, 3), 8, torch.float64, "cpu", rng)
    with cf.use_backend("eager"):
        eager = cf.ops.dropout_add_layer_norm(x, residual, weight, bias, p=0.5, eps=1e-5, training=False)
    torch.testing.assert_close(eager, torch.nn.functional.layer_norm(x + residual, (8,), weight, bias, 1e-5))


def test_set_backend_rejects_unknown_and_unavailable(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*'eager'"):
        cf.set_backend("cuda")
    _simulate_unavailable(monkeypatch, "triton", "simulated: triton did not import")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: simulated: triton did not import"):
        cf.set_backend("triton")
    assert cf.get_backend() == "auto"


def test_use_backend_scopes_and_restores(monkeypatch):
    _simulate_unavailable(monkeypatch, "triton", "simulated")
    with cf.use_backend("eager"):
        assert cf.get_backend() == "eager"
        with pytest.raises(RuntimeError):
            with cf.use_backend("triton"):
                pass
        assert cf.get_backend() == "eager"
    assert cf.get_backend() == "auto"


def test_auto_warns_once_when_a_shipped_backend_failed(monkeypatch):
    """Simulate a backend that ships but failed to load: `auto` uses the next one and warns once."""
    _simulate_unavailable(monkeypatch, "cpp", "simulated: _C missing")
    monkeypatch.setattr(backend, "_failed_to_load", {"cpp"})
    monkeypatch.setattr(backend, "_warned_fallback", set())
    x, weight, bias = grouped_inputs((2, 3), 2, 2, 2)
    with pytest.warns(RuntimeWarning, match="backend 'cpp' cannot run on cpu \\(simulated: _C missing\\)"):
        cf.ops.grouped_linear(x, weight, bias)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cf.ops.grouped_linear(x, weight, bias)  # second call: no warning
    with pytest.raises(RuntimeError, match="simulated: _C missing"):
        cf.set_backend("cpp")


def test_a_backend_without_kernels_for_a_device_says_so(monkeypatch):
    monkeypatch.setattr(backend, "_device_gaps", {("cpp", "cpu"): "simulated: built without CPU kernels"})
    monkeypatch.setattr(backend, "_warned_fallback", set())
    x, weight, bias = grouped_inputs((2, 3), 2, 2, 2)
    with cf.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="backend 'cpp' cannot run on cpu: simulated"):
            cf.ops.grouped_linear(x, weight, bias)
    with pytest.warns(RuntimeWarning, match="simulated: built without CPU kernels"):
        cf.ops.grouped_linear(x, weight, bias)  # auto: falls back to eager, once with a warning


def test_auto_on_cuda_follows_the_measured_table(monkeypatch):
    """`auto` on a GPU takes, per op, the backend a committed benchmark record measured faster; else cpp."""
    monkeypatch.setattr(backend, "gpu_family", lambda index: "hopper")
    cuda = torch.device("cuda", 0)
    assert backend._auto_order("grouped_linear", cuda) == ("cpp", "triton", "eager")
    monkeypatch.setitem(backend.MEASURED_CUDA_CHOICE, ("hopper", "grouped_linear"), "triton")
    assert backend._auto_order("grouped_linear", cuda) == ("triton", "cpp", "eager")
    assert backend._auto_order("dynamic_span_conv", cuda) == ("cpp", "triton", "eager")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "backend_name,device",
    [
        ("cpp", "cpu"),  # the only L=512 check of the CPU kernels
        pytest.param("cpp", "cuda", marks=NO_GPU),
        pytest.param("triton", "cuda", marks=NO_GPU),  # Triton's interpreter at these sizes would take minutes
    ],
)
def test_full_shapes(backend_name, device, dtype, rng):
    """ConvBERT-base shapes (L=512, 6 conv heads of 64, C=768, K=9) and medium-small's FFN, forward and backward,
    within the low-precision rule against the fp64 oracle."""
    with cf.use_backend(backend_name):
        values, logits = on(device, span_inputs(4, 512, 6, 64, 9, dtype, rng))
        assert_within_torch_error(
            cf.ops.dynamic_span_conv(values, logits, 6),
            dynamic_span_conv_ref(values, logits, 6),
            dynamic_span_conv_ref(values.double(), logits.double(), 6),
        )
        inputs = on(device, separable_inputs(4, 512, 768, 384, 9, dtype, rng))
        query = randn(4, 512, 384, dtype=dtype, gen=rng).to(device)
        assert_within_torch_error(
            cf.ops.separable_conv1d(*inputs, multiplier=query),
            separable_conv1d_ref(*inputs) * query,
            separable_conv1d_ref(*double(inputs)) * query.double(),
        )
        inputs = on(device, grouped_inputs((4, 512), 2, 192, 768, dtype, rng))
        assert_within_torch_error(
            cf.ops.grouped_linear(*inputs, activation="gelu"),
            torch.nn.functional.gelu(grouped_linear_ref(*inputs)),
            torch.nn.functional.gelu(grouped_linear_ref(*double(inputs))),
        )
        # gradients, against autograd through the reference in the same dtype (the rule again)
        leaves = [t.detach().requires_grad_() for t in (values, logits)]
        grad = torch.randn(values.shape, generator=rng).to(device, dtype)
        ours = torch.autograd.grad(cf.ops.dynamic_span_conv(*leaves, 6), leaves, grad)
        same_dtype = torch.autograd.grad(dynamic_span_conv_ref(*leaves, 6), leaves, grad)
        oracle_leaves = [t.detach().double().requires_grad_() for t in leaves]
        oracle = torch.autograd.grad(dynamic_span_conv_ref(*oracle_leaves, 6), oracle_leaves, grad.double())
        for a, b, c in zip(ours, same_dtype, oracle):
            assert_within_torch_error(a, b, c)


@NO_GPU
@pytest.mark.parametrize("op_name", ["separable_conv1d", "grouped_linear"])
def test_every_autotuned_triton_config_at_base_shapes(op_name, rng, monkeypatch):
    """Users and benchmarks get whichever of the autotuner's configs measures fastest on their GPU, so each is
    pinned in turn (the autotuner then runs it without benchmarking) and checked at ConvBERT-base shapes in bf16,
    forward and backward, against the reference within the low-precision rule. tools/gpu_check.sh runs this with
    CONVBERT_FAST_TRITON_AUTOTUNE=1; the rest of the suite runs with one small config."""
    from convbert_fast.ops import triton as triton_backend

    if not triton_backend.AUTOTUNE:
        pytest.skip("CONVBERT_FAST_TRITON_AUTOTUNE=0: the Triton kernels run one fixed config, not the tuned ones")
    module = importlib.import_module(f"convbert_fast.ops.triton.{op_name}")
    kernel = module._separable_fwd_kernel if op_name == "separable_conv1d" else module._grouped_gemm_kernel
    device, dtype = "cuda", torch.bfloat16
    if op_name == "separable_conv1d":
        inputs = on(device, separable_inputs(32, 512, 768, 384, 9, dtype, rng))
        extra = [randn(32, 512, 384, dtype=dtype, gen=rng).to(device)]  # the query multiplier, fused

        def ref(*args):
            return separable_conv1d_ref(*args[:4]) * args[4]

        def op(*args):
            return cf.ops.separable_conv1d(*args[:4], multiplier=args[4])
    else:
        inputs = on(device, grouped_inputs((32, 512), 2, 192, 768, dtype, rng))
        extra = []

        def ref(*args):
            return torch.nn.functional.gelu(grouped_linear_ref(*args))

        def op(*args):
            return cf.ops.grouped_linear(*args, activation="gelu")

    leaves = [t.requires_grad_() for t in (*inputs, *extra)]
    expected = ref(*leaves)
    oracle_leaves = [t.detach().double().requires_grad_() for t in leaves]
    oracle = ref(*oracle_leaves)
    grad = torch.randn(expected.shape, generator=rng).to(device, dtype)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    oracle_grads = torch.autograd.grad(oracle, oracle_leaves, grad.double())
    configs = list(kernel.configs)
    assert len(configs) > 1
    for config in configs:
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {}, raising=False)  # no tuned choice left over; restored afterwards
        with cf.use_backend("triton"):
            out = op(*leaves)
            grads = torch.autograd.grad(out, leaves, grad)
        assert_within_torch_error(out, expected, oracle)
        for a, b, c in zip(grads, expected_grads, oracle_grads):
            assert_within_torch_error(a, b, c)
