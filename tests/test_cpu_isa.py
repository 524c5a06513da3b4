"""The CPU kernels at every x86 level this CPU has (csrc/cpu/common.h, CpuIsa): a machine runs only its best level
unless told otherwise, so each level is set here in turn (set_cpu_isa) and checked against the reference math (fp32,
fp64), against the fp32 kernels rounded once (bf16: the vectorised conversions), for the dropout mask's bits and
for results that do not depend on the thread count. The AVX2 and baseline copies are what a CPU without AVX-512
(or any non-x86-64-v3 one) runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from reference import dropout_keep_mask_ref, dynamic_span_conv_ref, layer_norm_ref, separable_conv1d_ref
from samples import randn, span_inputs

from convbert_fast.ops import cpp

pytestmark = pytest.mark.skipif(not cpp.LOADED, reason="convbert_fast._C did not load")

LEVELS = ("avx512", "avx2", "baseline")


def supported_levels():
    best = cpp.cpu_isa() if cpp.LOADED else "baseline"
    return LEVELS[LEVELS.index(best) :]


@pytest.fixture(params=LEVELS)
def level(request):
    """The kernels at this level for the test, then the level in use before."""
    if request.param not in supported_levels():
        pytest.skip(f"this CPU runs the kernels at most at {supported_levels()[0]}")
    previous = cpp.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        cpp.set_cpu_isa(previous)


def span_conv(values, logits, heads, grad):
    out = torch.ops.convbert_fast.dynamic_span_conv(values, logits, heads)
    return (out, *torch.ops.convbert_fast.dynamic_span_conv_backward(grad, values, logits, heads))


def separable_conv(x, depthwise, pointwise, bias, grad):
    out = torch.ops.convbert_fast.separable_conv1d(x, depthwise, pointwise, bias)
    return (out, *torch.ops.convbert_fast.separable_conv1d_backward(grad, x, depthwise, pointwise, bias))


def norm(x, residual, weight, bias, grad, p=0.1, seed=2024):
    seed = torch.tensor(seed)
    out, mean, rstd = torch.ops.convbert_fast.dropout_add_layer_norm(x, residual, weight, bias, p, 1e-5, seed)
    grads = torch.ops.convbert_fast.dropout_add_layer_norm_backward(grad, x, residual, weight, mean, rstd, p, seed)
    return (out, mean, rstd, *grads)


def op_inputs(dtype, gen):
    """(name, op, inputs) for the three ops with kernels of their own, at widths that reach every tile's tail
    (D = 40: two full 16-lane tiles and 8 more; C = 200: three 64-channel tiles and 8 more) and sequences
    shorter and longer than the span; the upstream gradient last."""
    values, logits = span_inputs(2, 21, 3, 40, 9, dtype, gen)
    x = randn(2, 19, 200, dtype=dtype, gen=gen)
    depthwise, pointwise = randn(200, 1, 9, dtype=dtype, scale=0.3, gen=gen), randn(24, 200, 1, dtype=dtype, gen=gen)
    rows, channels = (3, 7), 200
    return [
        ("dynamic_span_conv", span_conv, [values, logits, 3, randn(*values.shape, dtype=dtype, gen=gen)]),
        ("separable_conv1d", separable_conv,
         [x, depthwise, pointwise, randn(24, dtype=dtype, gen=gen), randn(2, 19, 24, dtype=dtype, gen=gen)]),
        ("dropout_add_layer_norm", norm,
         [randn(*rows, channels, dtype=dtype, gen=gen), randn(*rows, channels, dtype=dtype, gen=gen),
          1 + 0.1 * randn(channels, dtype=dtype, gen=gen), 0.1 * randn(channels, dtype=dtype, gen=gen),
          randn(*rows, channels, dtype=dtype, gen=gen)]),
    ]  # fmt: skip


def reference_forward(name, args):
    """Each op's forward from its definition (tests/reference.py), in the inputs' dtype; the layer norm without
    dropout."""
    if name == "dynamic_span_conv":
        return dynamic_span_conv_ref(*args[:3])
    if name == "separable_conv1d":
        return separable_conv1d_ref(*args[:4])
    x, residual, weight, bias = args[:4]
    return layer_norm_ref(x + residual, weight, bias, 1e-5)


def run(name, op, args):
    return op(*args, p=0.0) if name == "dropout_add_layer_norm" else op(*args)


def assert_close_to_scale(actual, expected, relative, message):
    """|actual - expected| <= relative * max|expected| everywhere: rounding differences pass, a wrong tile does not."""
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    error = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert error <= relative * scale, f"{message}: error {error:.3e} against a scale of {scale:.3e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_every_level_matches_the_reference_and_the_best_level(level, dtype, rng):
    """The forward against the definition in fp64, and the forward and every gradient against the same kernels at
    the CPU's best level: to 1e-12 of the largest value in fp64, 1e-5 in fp32 (the levels differ only in fused
    multiply-adds; a wrong tile or tap is off by the values themselves)."""
    relative = 1e-12 if dtype == torch.float64 else 1e-5
    for name, op, args in op_inputs(dtype, rng):
        got = run(name, op, args)
        oracle = reference_forward(name, [a.double() if isinstance(a, torch.Tensor) else a for a in args])
        assert_close_to_scale(got[0], oracle, relative, f"{name} at {level} against the definition")
        previous = cpp.set_cpu_isa(supported_levels()[0])
        try:
            best = run(name, op, args)
        finally:
            cpp.set_cpu_isa(previous)
        for i, (a, b) in enumerate(zip(got, best)):
            assert_close_to_scale(a, b, relative, f"{name} output {i} at {level} against {supported_levels()[0]}")


def assert_same_bits_or_both_nan(actual, expected, message):
    both_nan = actual.isnan() & expected.isnan()
    assert torch.equal(actual.isnan(), expected.isnan()), message
    same = actual.view(torch.int16) == expected.view(torch.int16)
    assert bool((same | both_nan).all()), f"{message}: {int((~(same | both_nan)).sum())} elements differ"


def test_bf16_is_the_fp32_kernel_rounded_once(level, rng):
    """bf16 lanes are widened to fp32 exactly and each result is rounded once, to nearest even: every per-channel
    output the kernels write (the forward; the span conv's d(values); the separable conv's d(x) and d(depthwise
    weight); the layer norm's d(x) and d(residual)) is bit for bit the fp32 kernel's on the same values, rounded by
    torch. A NaN and an inf among the inputs included (NaN where fp32 has NaN). The separable conv with an identity
    pointwise weight and no bias: its GEMMs then pass the depthwise kernel's values through unchanged. The span conv's
    d(logits) sums each dot product over its channels in another order in bf16 (even and odd channels apart): within
    one bf16 rounding of the fp32 value, plus fp32 rounding at the largest value's scale."""
    written = {"dynamic_span_conv": (0, 1), "separable_conv1d": (0, 1, 2), "dropout_add_layer_norm": (0, 3, 4)}
    for name, op, args in op_inputs(torch.bfloat16, rng):
        if name == "separable_conv1d":
            channels = args[0].shape[-1]
            args[2] = torch.eye(channels, dtype=torch.bfloat16).unsqueeze(-1)
            args[3] = torch.zeros(channels, dtype=torch.bfloat16)
            args[4] = randn(*args[0].shape, dtype=torch.bfloat16, gen=rng)
        args[0] = args[0].clone()
        args[0].view(-1)[[5, 77]] = torch.tensor([float("nan"), float("inf")], dtype=torch.bfloat16)
        got = op(*args)
        wide = op(*(a.float() if isinstance(a, torch.Tensor) else a for a in args))
        for i in written[name]:
            assert got[i].dtype == torch.bfloat16
            assert_same_bits_or_both_nan(got[i], wide[i].bfloat16(), f"{name} output {i} at {level}")
        if name == "dynamic_span_conv":
            grad_logits, expected = got[2].float(), wide[2]
            assert torch.equal(grad_logits.isnan(), expected.isnan())
            finite = expected.isfinite()
            assert torch.equal(grad_logits[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()])
            error = (grad_logits - expected)[finite].abs()
            bound = torch.finfo(torch.bfloat16).eps * expected[finite].abs() + 2**-16 * expected[finite].abs().max()
            assert bool((error <= bound).all()), f"d(logits) at {level}: {(error - bound).max():.3e} beyond the bound"


def test_the_bit_comparison_fails_on_truncation_instead_of_rounding(rng):
    """The check above tells rounding to nearest even from truncation (a kernel that dropped the low 16 bits)."""
    wide = torch.randn(1000, generator=rng)
    truncated = (wide.view(torch.int32) & -65536).view(torch.float32).bfloat16()  # exact: the low bits are zero
    with pytest.raises(AssertionError, match="elements differ"):
        assert_same_bits_or_both_nan(truncated, wide.bfloat16(), "truncated")


def test_the_dropout_mask_is_the_documented_hash_at_every_level(level):
    """The mask read back (x = 1, residual = 0: a dropped element normalises below zero) against the independent
    definition (reference.py), in fp32 and bf16: the hash loop is vectorised differently at each level."""
    shape, p, seed = (5, 3, 257), 0.3, 99
    for dtype in (torch.float32, torch.bfloat16):
        ones = torch.ones(shape, dtype=dtype)
        unit, zero = torch.ones(shape[-1], dtype=dtype), torch.zeros(shape[-1], dtype=dtype)
        out = torch.ops.convbert_fast.dropout_add_layer_norm(
            ones, torch.zeros_like(ones), unit, zero, p, 1e-5, torch.tensor(seed)
        )[0]
        assert torch.equal(out > 0, dropout_keep_mask_ref(shape, p, seed)), f"{dtype} at {level}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_results_do_not_depend_on_the_thread_count(level, dtype, rng):
    """Every output of the kernels, with 1 thread and with 2: the same bits (rows are split between threads, sums
    are not). Longer inputs than elsewhere so that 2 threads do split the rows."""
    gen_state = rng.get_state()
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert cpp.cpu_threads() == count  # else the kernels never split the rows, and this test proves nothing
            rng.set_state(gen_state)
            values, logits = span_inputs(2, 300, 3, 40, 9, dtype, rng)
            span = span_conv(values, logits, 3, randn(*values.shape, dtype=dtype, gen=rng))
            x = randn(2, 300, 200, dtype=dtype, gen=rng)
            weights = randn(200, 1, 9, dtype=dtype, gen=rng), randn(24, 200, 1, dtype=dtype, gen=rng)
            bias, grad = randn(24, dtype=dtype, gen=rng), randn(2, 300, 24, dtype=dtype, gen=rng)
            separable = separable_conv(x, *weights, bias, grad)
            tensors = [randn(600, 200, dtype=dtype, gen=rng) for _ in range(2)] + [randn(200, dtype=dtype, gen=rng)] * 2
            layer_norm = norm(*tensors, randn(600, 200, dtype=dtype, gen=rng))
            results.append([*span, *separable, *layer_norm])
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads at {level}"


def test_kernels_run_on_torchs_threads():
    """at::parallel_for runs the kernels on torch's OpenMP pool only where the extension was compiled with OpenMP
    (setup.py); without it, every kernel ran on one thread whatever torch.set_num_threads said. 3 threads too: a
    pool larger than this machine's cores still splits the work."""
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            assert cpp.cpu_threads() == count, f"torch.set_num_threads({count}): the kernels ran on {cpp.cpu_threads()}"
    finally:
        torch.set_num_threads(threads)


def test_set_cpu_isa_refuses_a_level_it_does_not_know():
    with pytest.raises(ValueError, match="avx512, avx2 or baseline, got 'avx1024'"):
        cpp.set_cpu_isa("avx1024")


@pytest.mark.skipif("avx512" in supported_levels(), reason="this CPU has AVX-512: no level above its own to refuse")
def test_set_cpu_isa_refuses_a_level_this_cpu_lacks():
    with pytest.raises(ValueError, match="runs the kernels at most at"):
        cpp.set_cpu_isa("avx512")


@pytest.mark.timeout(120)  # one child process importing torch: 5 s on a loaded 2-core Xeon
def test_the_environment_variable_caps_the_level():
    """CONVBERT_FAST_CPU_ISA read at the first kernel call: a bad value is a ValueError naming the variable (at every
    call, and in `info`), a good one is the level used; `info` names it."""
    code = """
import os, torch, convbert_fast as cf
from convbert_fast import cli
x = torch.ones(1, 4, 8)
try:
    cf.ops.separable_conv1d(x, torch.ones(8, 1, 3), torch.ones(4, 8, 1), torch.zeros(4))
except ValueError as error:
    print("refused:", error)
cli.info()
os.environ["CONVBERT_FAST_CPU_ISA"] = "baseline"
cf.ops.separable_conv1d(x, torch.ones(8, 1, 3), torch.ones(4, 8, 1), torch.zeros(4))
print("level:", cf.ops.cpp.cpu_isa())
cli.info()
"""
    env = {**os.environ, "CONVBERT_FAST_CPU_ISA": "sse9"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=100)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "refused: CONVBERT_FAST_CPU_ISA must be avx512, avx2 or baseline, got 'sse9'" in lines
    kernels = [line for line in lines if line.startswith("cpu kernels")]
    assert "CONVBERT_FAST_CPU_ISA must be" in kernels[0] and kernels[1].startswith("cpu kernels    baseline ("), kernels
    assert "level: baseline" in lines
