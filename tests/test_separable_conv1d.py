"""separable_conv1d on every backend and device: values against the independent reference, gradients, argument
checks, and its kernels as torch.library ops (both namespaces)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, NAMESPACE_DEVICES, opcheck
from reference import (
    assert_backward_bitwise_repeatable,
    assert_gradients_for_only_some_inputs,
    assert_gradients_match,
    assert_within_dtype_bound,
    assert_within_torch_error,
    scaled_copy,
    separable_conv1d_ref,
    shifted_window_copy,
)
from samples import (
    DTYPES,
    LOW_PRECISION,
    SEPARABLE_CASES,
    assert_every_tensor_argument_checked,
    assert_refuses,
    double,
    gradcheck,
    on,
    randn,
    requiring_grad,
    separable_conv1d_samples,
    separable_inputs,
    strided,
)

import convbert_fast as cf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SEPARABLE_CASES)
def test_separable_conv1d_matches_reference(backend_device, dtype, case, rng):
    _, device = backend_device
    batch, seq_len, channels, out_channels, kernel_size = case
    inputs = on(device, separable_inputs(batch, seq_len, channels, out_channels, kernel_size, dtype, rng))
    out = cf.ops.separable_conv1d(*inputs)
    assert out.shape == (batch, seq_len, out_channels) and out.dtype == dtype and out.device.type == device
    if out.numel():
        oracle = separable_conv1d_ref(*double(inputs))
        assert_within_torch_error(out, separable_conv1d_ref(*inputs), oracle)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SEPARABLE_CASES[:4])
def test_separable_conv1d_with_multiplier_matches_reference(backend_device, dtype, case, rng):
    """ConvBERT multiplies the separable conv by the query; the Triton kernel fuses it into its epilogue."""
    _, device = backend_device
    batch, seq_len, channels, out_channels, kernel_size = case
    inputs = on(device, separable_inputs(batch, seq_len, channels, out_channels, kernel_size, dtype, rng))
    multiplier = randn(batch, seq_len, out_channels, dtype=dtype, gen=rng).to(device)
    out = cf.ops.separable_conv1d(*inputs, multiplier=multiplier)
    assert out.shape == (batch, seq_len, out_channels) and out.dtype == dtype

    def ref(*args):
        return separable_conv1d_ref(*args[:4]) * args[4]

    if out.numel():
        assert_within_torch_error(out, ref(*inputs, multiplier), ref(*double(inputs), multiplier.double()))


def test_non_contiguous_inputs(backend_device, rng):
    _, device = backend_device
    x, dw, pw, bias = on(device, separable_inputs(2, 11, 8, 6, 5, gen=rng))
    expected = separable_conv1d_ref(x, dw, pw, bias)
    torch.testing.assert_close(cf.ops.separable_conv1d(strided(x), strided(dw), strided(pw), strided(bias)), expected)


def test_bias_may_be_flat_or_column(backend_device, rng):
    _, device = backend_device
    x, dw, pw, bias = on(device, separable_inputs(2, 8, 4, 6, 3, gen=rng))
    torch.testing.assert_close(cf.ops.separable_conv1d(x, dw, pw, bias), cf.ops.separable_conv1d(x, dw, pw, bias[:, 0]))


# --- gradients ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [1, 3, 9])
def test_separable_conv1d_gradcheck(backend_device, kernel_size, rng):
    inputs = requiring_grad(separable_inputs(2, 6, 3, 4, kernel_size, gen=rng), backend_device[1])
    assert gradcheck(backend_device, cf.ops.separable_conv1d, inputs)


def test_separable_conv1d_with_multiplier_gradcheck(backend_device, rng):
    inputs = requiring_grad(
        (*separable_inputs(2, 6, 3, 4, 3, gen=rng), torch.randn(2, 6, 4, generator=rng)), backend_device[1]
    )
    assert gradcheck(backend_device, lambda *a: cf.ops.separable_conv1d(*a[:4], multiplier=a[4]), inputs)


def _gradient_inputs(device, gen):
    return on(device, separable_inputs(2, 7, 5, 6, 9, torch.float64, gen))


def test_gradients_match_reference(backend_device, rng):
    assert_gradients_match(cf.ops.separable_conv1d, separable_conv1d_ref, _gradient_inputs(backend_device[1], rng), rng)


def test_gradients_for_only_some_inputs(backend_device, rng):
    inputs = _gradient_inputs(backend_device[1], rng)
    assert_gradients_for_only_some_inputs(cf.ops.separable_conv1d, separable_conv1d_ref, inputs)


def test_backward_is_bitwise_repeatable(backend_device, rng):
    inputs = [t.float() for t in _gradient_inputs(backend_device[1], rng)]
    assert_backward_bitwise_repeatable(cf.ops.separable_conv1d, inputs)


# --- argument checks ----------------------------------------------------------------------------------------------


def _sep():
    return separable_inputs(2, 8, 4, 6, 3)


BAD_CALLS = [
    # (description, call, exception, message fragment)
    ("x not a tensor", lambda: cf.ops.separable_conv1d([1.0], *_sep()[1:]), TypeError, "`x` must be a torch.Tensor"),
    ("integer x", lambda: cf.ops.separable_conv1d(_sep()[0].long(), *_sep()[1:]), TypeError, "floating-point"),
    ("x 2-D", lambda: cf.ops.separable_conv1d(_sep()[0][0], *_sep()[1:]), ValueError, "`x` must have shape"),
    (
        "depthwise channels",
        lambda: cf.ops.separable_conv1d(_sep()[0], torch.randn(5, 1, 3), *_sep()[2:]),
        ValueError,
        "depthwise_weight",
    ),
    (
        "even K",
        lambda: cf.ops.separable_conv1d(_sep()[0], torch.randn(4, 1, 4), *_sep()[2:]),
        ValueError,
        "must be odd",
    ),
    (
        "pointwise",
        lambda: cf.ops.separable_conv1d(*_sep()[:2], torch.randn(6, 5, 1), _sep()[3]),
        ValueError,
        "pointwise_weight",
    ),
    ("bias", lambda: cf.ops.separable_conv1d(*_sep()[:3], torch.randn(7)), ValueError, "`bias`"),
    ("mixed dtypes", lambda: cf.ops.separable_conv1d(_sep()[0].double(), *_sep()[1:]), TypeError, "share one dtype"),
    (
        "two devices (separable)",
        lambda: cf.ops.separable_conv1d(_sep()[0].to("meta"), *_sep()[1:]),
        ValueError,
        "one device",
    ),
]


@pytest.mark.parametrize("description,call,exc,fragment", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_clearly(description, call, exc, fragment):
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        call()


# --- the kernels as torch.library custom ops -----------------------------------------------------------------------


OPCHECK_CASES = {"convbert_fast": SEPARABLE_CASES[:6], "convbert_fast_triton": SEPARABLE_CASES[:3]}


def opcheck_samples(namespace, device, gen):
    """(op overload, args) for the forward and backward ops of `namespace` (and the Triton backend's fused
    multiply). Empty batches are left to the value tests: opcheck's schema check cannot allocate for them."""
    ops = getattr(torch.ops, namespace)
    samples = []
    for (batch, seq_len, _, out_channels, _), inputs in separable_conv1d_samples(
        device, gen=gen, cases=OPCHECK_CASES[namespace]
    ):
        if batch == 0:
            continue
        samples.append((ops.separable_conv1d.default, tuple(t.requires_grad_() for t in inputs)))
        if hasattr(ops, "separable_conv1d_mul"):
            multiplier = torch.randn(batch, seq_len, out_channels, generator=gen).to(device)
            samples.append(
                (ops.separable_conv1d_mul.default, tuple(t.detach().requires_grad_() for t in (*inputs, multiplier)))
            )
        grad = torch.randn(batch, seq_len, out_channels, generator=gen).to(device)
        samples.append((ops.separable_conv1d_backward.default, (grad, *(t.detach() for t in inputs))))
    return samples


@pytest.mark.parametrize("namespace,device", NAMESPACE_DEVICES)
def test_opcheck_every_sample(namespace, device, rng):
    opcheck(opcheck_samples(namespace, device, rng), namespace, device)


# --- low precision against an fp32 oracle, and the proof that this test catches broken kernels -------------------


def check_separable_conv1d_low_precision(op, dtype, device, gen):
    """`op` on bf16/fp16 inputs against the reference in fp32 on the same inputs, within the dtype's bound (the
    body of the test below, and of the test that runs it on broken copies of the op)."""
    inputs = on(device, separable_inputs(2, 40, 32, 24, 9, dtype, gen))
    out = op(*inputs)
    oracle = separable_conv1d_ref(*(t.float() for t in inputs))
    magnitude = separable_conv1d_ref(*(t.float().abs() for t in inputs))
    assert_within_dtype_bound(out, oracle, magnitude)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_separable_conv1d_low_precision_within_the_dtype_bound(backend_device, dtype, rng):
    check_separable_conv1d_low_precision(cf.ops.separable_conv1d, dtype, backend_device[1], rng)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("broken", [shifted_window_copy, scaled_copy], ids=["window-shifted-by-one", "scaled-by-1.1"])
def test_separable_conv1d_low_precision_test_fails_on_a_broken_copy(device_name, dtype, broken, rng):
    with pytest.raises(AssertionError, match="exceeds its bound"):
        check_separable_conv1d_low_precision(broken(cf.ops.separable_conv1d), dtype, device_name, rng)


# --- the C++ ops called directly: every tensor argument checked at the boundary ----------------------------------


def _separable_direct_calls(device, gen):
    ops = torch.ops.convbert_fast
    inputs = on(device, separable_inputs(2, 8, 4, 6, 3, gen=gen))
    grad = torch.randn(2, 8, 6, generator=gen).to(device)
    return {
        "forward": (ops.separable_conv1d.default, tuple(inputs)),
        "backward": (ops.separable_conv1d_backward.default, (grad, *inputs)),
    }


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_separable_conv1d_direct_calls_check_every_tensor(device_name, which, rng):
    assert_every_tensor_argument_checked(*_separable_direct_calls(device_name, rng)[which], device_name)


# (which call, argument index, the bad argument from the good one, message)
SEPARABLE_BAD_SHAPES = [
    ("forward", 0, lambda t: t[0], r"x must be \[B, L, C\]"),
    ("forward", 1, lambda t: torch.cat([t, t[:1]]), r"depthwise_weight must be \[4, 1, K\]"),
    ("forward", 1, lambda t: torch.cat([t, t[..., :1]], -1), "K must be odd"),
    ("forward", 2, lambda t: torch.cat([t, t[:, :1]], 1), r"pointwise_weight must be \[A, 4, 1\]"),
    ("forward", 3, lambda t: torch.cat([t, t[:1]]), r"bias must be \[6\] or \[6, 1\]"),
    ("backward", 0, lambda t: t[..., :5], r"grad_out must be \[2, 8, 6\]"),
    ("backward", 4, lambda t: t[:5], r"bias must be \[6\] or \[6, 1\]"),
]


@pytest.mark.parametrize("which,index,make_bad,fragment", SEPARABLE_BAD_SHAPES)
def test_separable_conv1d_direct_calls_refuse_bad_shapes(device_name, which, index, make_bad, fragment, rng):
    assert_refuses(_separable_direct_calls(device_name, rng)[which], index, make_bad, ValueError, fragment)
