"""grouped_linear on every backend and device: values against the independent reference, gradients, argument
checks, autocast, and its kernels as torch.library ops (both namespaces)."""

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
    grouped_linear_ref,
    scaled_copy,
)
from samples import (
    DTYPES,
    GROUPED_CASES,
    LOW_PRECISION,
    assert_every_tensor_argument_checked,
    assert_refuses,
    double,
    gradcheck,
    grouped_inputs,
    grouped_linear_samples,
    on,
    requiring_grad,
    strided,
)

import convbert_fast as cf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_linear_matches_reference(backend_device, dtype, activation, case, rng):
    _, device = backend_device
    leading, groups, group_in, group_out = case
    inputs = on(device, grouped_inputs(leading, groups, group_in, group_out, dtype, rng))
    out = cf.ops.grouped_linear(*inputs, activation=activation)
    assert out.shape == (*leading, groups * group_out) and out.dtype == dtype

    def ref(*args):
        y = grouped_linear_ref(*args)
        return torch.nn.functional.gelu(y) if activation else y

    if out.numel():
        assert_within_torch_error(out, ref(*inputs), ref(*double(inputs)))


def test_non_contiguous_inputs(backend_device, rng):
    _, device = backend_device
    x, weight, bias = on(device, grouped_inputs((2, 11), 2, 4, 3, gen=rng))
    expected = grouped_linear_ref(x, weight, bias)
    torch.testing.assert_close(cf.ops.grouped_linear(strided(x), strided(weight), strided(bias)), expected)


# --- gradients ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_linear_gradcheck(backend_device, groups, activation, rng):
    inputs = requiring_grad(grouped_inputs((2, 3), groups, 2, 3, gen=rng), backend_device[1])
    assert gradcheck(backend_device, lambda *a: cf.ops.grouped_linear(*a, activation=activation), inputs)


def _gradient_inputs(device, gen):
    return on(device, grouped_inputs((2, 7), 2, 3, 4, torch.float64, gen))


def test_gradients_match_reference(backend_device, rng):
    assert_gradients_match(cf.ops.grouped_linear, grouped_linear_ref, _gradient_inputs(backend_device[1], rng), rng)


def test_gradients_for_only_some_inputs(backend_device, rng):
    inputs = _gradient_inputs(backend_device[1], rng)
    assert_gradients_for_only_some_inputs(cf.ops.grouped_linear, grouped_linear_ref, inputs)


def test_backward_is_bitwise_repeatable(backend_device, rng):
    inputs = [t.float() for t in _gradient_inputs(backend_device[1], rng)]
    assert_backward_bitwise_repeatable(cf.ops.grouped_linear, inputs)


# --- argument checks ----------------------------------------------------------------------------------------------


def _grp():
    return grouped_inputs((2, 8), 2, 4, 3)


BAD_CALLS = [
    # (description, call, exception, message fragment)
    (
        "weight 2-D",
        lambda: cf.ops.grouped_linear(_grp()[0], torch.randn(8, 6), _grp()[2]),
        ValueError,
        "`weight` must have shape",
    ),
    (
        "x features",
        lambda: cf.ops.grouped_linear(torch.randn(2, 9), *_grp()[1:]),
        ValueError,
        "`x` must have shape [..., 8]",
    ),
    ("bias size", lambda: cf.ops.grouped_linear(*_grp()[:2], torch.randn(5)), ValueError, "`bias` must have shape [6]"),
    (
        "int weight",
        lambda: cf.ops.grouped_linear(_grp()[0], _grp()[1].int(), _grp()[2]),
        TypeError,
        "`weight` must have a floating-point",
    ),
    (
        "groups do not divide",
        lambda: cf.ops.grouped_linear(torch.randn(2, 9), torch.randn(2, 4, 3), torch.randn(6)),
        ValueError,
        "num_groups 2 x 4",
    ),
    (
        "activation",
        lambda: cf.ops.grouped_linear(*_grp(), activation="relu"),
        ValueError,
        "`activation` must be None or 'gelu'",
    ),
]


@pytest.mark.parametrize("description,call,exc,fragment", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_clearly(description, call, exc, fragment):
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_mixed_dtypes_are_allowed_under_autocast(rng):
    x, weight, bias = grouped_inputs((2, 4), 2, 4, 3, gen=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with cf.use_backend("eager"):
            eager = cf.ops.grouped_linear(x.bfloat16(), weight, bias)
            expected = grouped_linear_ref(x.bfloat16(), weight, bias)
        with cf.use_backend("cpp"):
            cpp = cf.ops.grouped_linear(x.bfloat16(), weight, bias)
    # eager, as transformers: the matmul runs in bf16, the fp32 bias then promotes the sum to fp32
    assert eager.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(eager, expected)
    # cpp: every input cast to the autocast dtype, as autocast does for a linear layer
    assert cpp.dtype == torch.bfloat16
    torch.testing.assert_close(cpp.float(), eager, rtol=2e-2, atol=2e-2)


# --- the kernels as torch.library custom ops -----------------------------------------------------------------------


OPCHECK_CASES = {"convbert_fast": GROUPED_CASES, "convbert_fast_triton": GROUPED_CASES[:3]}


def opcheck_samples(namespace, device, gen):
    """(op overload, args) for the plain, GELU and backward ops of `namespace`. Empty inputs are left to the value
    tests: opcheck's schema check cannot allocate for them."""
    ops = getattr(torch.ops, namespace)
    samples = []
    for (leading, groups, _, group_out), inputs in grouped_linear_samples(
        device, gen=gen, cases=OPCHECK_CASES[namespace]
    ):
        if 0 in leading:
            continue
        samples.append((ops.grouped_linear.default, tuple(t.requires_grad_() for t in inputs)))
        samples.append((ops.grouped_linear_gelu.default, tuple(t.detach().requires_grad_() for t in inputs)))
        grad = torch.randn(*leading, groups * group_out, generator=gen).to(device)
        samples.append((ops.grouped_linear_backward.default, (grad, inputs[0].detach(), inputs[1].detach())))
    return samples


@pytest.mark.parametrize("namespace,device", NAMESPACE_DEVICES)
def test_opcheck_every_sample(namespace, device, rng):
    opcheck(opcheck_samples(namespace, device, rng), namespace, device)


# --- low precision against an fp32 oracle, and the proof that this test catches broken kernels -------------------


def check_grouped_linear_low_precision(op, dtype, device, gen):
    """`op` on bf16/fp16 inputs against the reference in fp32 on the same inputs, within the dtype's bound (the
    body of the test below, and of the test that runs it on broken copies of the op)."""
    inputs = on(device, grouped_inputs((2, 20), 2, 48, 64, dtype, gen))
    out = op(*inputs)
    oracle = grouped_linear_ref(*(t.float() for t in inputs))
    magnitude = grouped_linear_ref(*(t.float().abs() for t in inputs))
    assert_within_dtype_bound(out, oracle, magnitude)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_grouped_linear_low_precision_within_the_dtype_bound(backend_device, dtype, rng):
    check_grouped_linear_low_precision(cf.ops.grouped_linear, dtype, backend_device[1], rng)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_grouped_linear_low_precision_test_fails_on_a_broken_copy(device_name, dtype, rng):
    with pytest.raises(AssertionError, match="exceeds its bound"):
        check_grouped_linear_low_precision(scaled_copy(cf.ops.grouped_linear), dtype, device_name, rng)


# --- the C++ ops called directly: every tensor argument checked at the boundary ----------------------------------


def _grouped_direct_calls(device, gen):
    ops = torch.ops.convbert_fast
    inputs = on(device, grouped_inputs((2, 8), 2, 4, 3, gen=gen))
    grad = torch.randn(2, 8, 6, generator=gen).to(device)
    return {
        "forward": (ops.grouped_linear.default, tuple(inputs)),
        "gelu": (ops.grouped_linear_gelu.default, tuple(inputs)),
        "backward": (ops.grouped_linear_backward.default, (grad, *inputs[:2])),
    }


@pytest.mark.parametrize("which", ["forward", "gelu", "backward"])
def test_grouped_linear_direct_calls_check_every_tensor(device_name, which, rng):
    assert_every_tensor_argument_checked(*_grouped_direct_calls(device_name, rng)[which], device_name)


# (which call, argument index, the bad argument from the good one, message)
GROUPED_BAD_SHAPES = [
    ("forward", 0, lambda t: t[..., :7], r"x must be \[\.\.\., 8\]"),
    ("forward", 1, lambda t: t[0], r"weight must be \[G, Din/G, Dout/G\]"),
    ("forward", 2, lambda t: t[:5], r"bias must be \[6\]"),
    ("gelu", 2, lambda t: t[None], r"bias must be \[6\]"),
    ("backward", 0, lambda t: t[..., :5], r"grad_pre must be \[2, 8, 6\]"),
    ("backward", 0, lambda t: t[:1], r"grad_pre must be \[2, 8, 6\]"),
    ("backward", 1, lambda t: t[..., :7], r"x must be \[\.\.\., 8\]"),
]


@pytest.mark.parametrize("which,index,make_bad,fragment", GROUPED_BAD_SHAPES)
def test_grouped_linear_direct_calls_refuse_bad_shapes(device_name, which, index, make_bad, fragment, rng):
    assert_refuses(_grouped_direct_calls(device_name, rng)[which], index, make_bad, ValueError, fragment)
