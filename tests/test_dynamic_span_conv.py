"""dynamic_span_conv on every backend and device: values against the independent reference, padding and NaN
spread, gradients, argument checks, and its kernels as torch.library ops (both namespaces)."""

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
    dynamic_span_conv_ref,
    scaled_copy,
    shifted_window_copy,
)
from samples import (
    DTYPES,
    LOW_PRECISION,
    SPAN_CASES,
    assert_every_tensor_argument_checked,
    assert_refuses,
    double,
    dynamic_span_conv_samples,
    gradcheck,
    on,
    randn,
    requiring_grad,
    span_inputs,
    strided,
)

import convbert_fast as cf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SPAN_CASES)
def test_dynamic_span_conv_matches_reference(backend_device, dtype, case, rng):
    _, device = backend_device
    batch, seq_len, heads, head_size, kernel_size = case
    values, logits = on(device, span_inputs(batch, seq_len, heads, head_size, kernel_size, dtype, rng))
    out = cf.ops.dynamic_span_conv(values, logits, heads)
    assert out.shape == values.shape and out.dtype == dtype and out.device.type == device
    if out.numel():
        oracle = dynamic_span_conv_ref(values.double(), logits.double(), heads)
        assert_within_torch_error(out, dynamic_span_conv_ref(values, logits, heads), oracle)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SPAN_CASES[:5])
def test_dynamic_span_conv_after_a_prefix_matches_reference(backend_device, dtype, case, rng):
    """prefix= writes [prefix | span conv] along the channels; the prefix is a transposed [B, H, L, D] view, as
    the model passes its attention half."""
    _, device = backend_device
    batch, seq_len, heads, head_size, kernel_size = case
    values, logits = on(device, span_inputs(batch, seq_len, heads, head_size, kernel_size, dtype, rng))
    attention = randn(batch, heads, seq_len, head_size, dtype=dtype, gen=rng).to(device).transpose(1, 2)
    out = cf.ops.dynamic_span_conv(values, logits, heads, prefix=attention)
    assert out.shape == (batch, seq_len, 2 * heads * head_size) and out.dtype == dtype
    width = heads * head_size
    assert torch.equal(out[..., :width], attention.reshape(batch, seq_len, width))  # copied exactly
    if out.numel():
        oracle = dynamic_span_conv_ref(values.double(), logits.double(), heads)
        assert_within_torch_error(out[..., width:], dynamic_span_conv_ref(values, logits, heads), oracle)


def test_non_contiguous_inputs(backend_device, rng):
    _, device = backend_device
    values, logits = on(device, span_inputs(2, 11, 3, 16, 9, gen=rng))
    expected = dynamic_span_conv_ref(values, logits, 3)
    torch.testing.assert_close(cf.ops.dynamic_span_conv(strided(values), strided(logits), 3), expected)


def test_span_conv_is_zero_padded_at_both_ends(backend_device):
    """With all weight on the farthest left offset, token t reads token t - (K-1)/2, and zeros before 0."""
    _, device = backend_device
    kernel_size, seq_len = 5, 6
    values = torch.arange(1.0, seq_len + 1, device=device).reshape(1, seq_len, 1)
    logits = torch.full((1, seq_len, kernel_size), -1e4, device=device)
    logits[..., 0] = 0.0
    out = cf.ops.dynamic_span_conv(values, logits, 1).flatten()
    assert out.tolist() == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_nan_spreads_only_into_windows_that_cover_it(backend_device, rng):
    _, device = backend_device
    heads, head_size, kernel_size, seq_len = 2, 4, 5, 12
    values, logits = on(device, span_inputs(1, seq_len, heads, head_size, kernel_size, gen=rng))
    values[0, 6, head_size + 1] = float("nan")  # head 1, channel 1, token 6
    out = cf.ops.dynamic_span_conv(values, logits, heads)
    expected = torch.zeros_like(out, dtype=torch.bool)
    expected[0, 6 - kernel_size // 2 : 6 + kernel_size // 2 + 1, head_size + 1] = True
    assert torch.equal(out.isnan(), expected)
    logits[0, 3, kernel_size + 2] = float("nan")  # head 1's logits at token 3: all of that head's row
    out = cf.ops.dynamic_span_conv(values, logits, heads)
    expected[0, 3, head_size:] = True
    assert torch.equal(out.isnan(), expected)


# --- gradients ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size,seq_len", [(1, 4), (3, 6), (9, 5)])
def test_dynamic_span_conv_gradcheck(backend_device, kernel_size, seq_len, rng):
    values, logits = requiring_grad(span_inputs(2, seq_len, 2, 3, kernel_size, gen=rng), backend_device[1])
    assert gradcheck(backend_device, lambda v, k: cf.ops.dynamic_span_conv(v, k, 2), (values, logits))


def test_dynamic_span_conv_after_a_prefix_gradcheck(backend_device, rng):
    _, device = backend_device
    values, logits = requiring_grad(double(span_inputs(2, 5, 2, 3, 3, gen=rng)), device)
    prefix = torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=rng).to(device).transpose(1, 2).requires_grad_()
    assert gradcheck(
        backend_device, lambda p, v, k: cf.ops.dynamic_span_conv(v, k, 2, prefix=p), (prefix, values, logits)
    )


def _gradient_inputs(device, gen):
    return on(device, span_inputs(2, 7, 2, 3, 9, torch.float64, gen))


def test_gradients_match_reference(backend_device, rng):
    assert_gradients_match(_span_conv_2_heads, _span_conv_ref_2_heads, _gradient_inputs(backend_device[1], rng), rng)


def test_gradients_for_only_some_inputs(backend_device, rng):
    inputs = _gradient_inputs(backend_device[1], rng)
    assert_gradients_for_only_some_inputs(_span_conv_2_heads, _span_conv_ref_2_heads, inputs)


def test_backward_is_bitwise_repeatable(backend_device, rng):
    inputs = [t.float() for t in _gradient_inputs(backend_device[1], rng)]
    assert_backward_bitwise_repeatable(_span_conv_2_heads, inputs)


def _span_conv_2_heads(values, kernel_logits):
    return cf.ops.dynamic_span_conv(values, kernel_logits, 2)


def _span_conv_ref_2_heads(values, kernel_logits):
    return dynamic_span_conv_ref(values, kernel_logits, 2)


# --- argument checks ----------------------------------------------------------------------------------------------


def _span():
    return span_inputs(2, 8, 2, 4, 3)


BAD_CALLS = [
    # (description, call, exception, message fragment)
    ("num_heads float", lambda: cf.ops.dynamic_span_conv(*_span(), 2.0), TypeError, "`num_heads` must be an int"),
    ("num_heads 0", lambda: cf.ops.dynamic_span_conv(*_span(), 0), ValueError, "at least 1"),
    ("heads do not divide A", lambda: cf.ops.dynamic_span_conv(*_span(), 3), ValueError, "not divisible by num_heads"),
    ("even span", lambda: cf.ops.dynamic_span_conv(_span()[0], torch.randn(2, 8, 8), 2), ValueError, "must be odd"),
    (
        "logits length",
        lambda: cf.ops.dynamic_span_conv(_span()[0], torch.randn(2, 7, 6), 2),
        ValueError,
        "`kernel_logits` must have shape",
    ),
    (
        "values 2-D",
        lambda: cf.ops.dynamic_span_conv(_span()[0][0], _span()[1], 2),
        ValueError,
        "`values` must have shape",
    ),
    (
        "two devices",
        lambda: cf.ops.dynamic_span_conv(_span()[0], _span()[1].to("meta"), 2),
        ValueError,
        "`values` is on cpu, `kernel_logits` on meta",
    ),
]


@pytest.mark.parametrize("description,call,exc,fragment", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_clearly(description, call, exc, fragment):
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        call()


# --- the kernels as torch.library custom ops -----------------------------------------------------------------------


OPCHECK_CASES = {"convbert_fast": SPAN_CASES[:6], "convbert_fast_triton": SPAN_CASES[:4]}


def opcheck_samples(namespace, device, gen):
    """(op overload, args) for the forward, backward and concat ops of `namespace` (and the cpp backend's
    in-place variant). Empty batches are left to the value tests: opcheck's schema check cannot allocate for them."""
    ops = getattr(torch.ops, namespace)
    samples = []
    for (batch, seq_len, heads, _, _), (values, logits) in dynamic_span_conv_samples(
        device, gen=gen, cases=OPCHECK_CASES[namespace]
    ):
        if batch == 0:
            continue
        samples.append((ops.dynamic_span_conv.default, (values.requires_grad_(), logits.requires_grad_(), heads)))
        grad = torch.randn(values.shape, generator=gen).to(device)
        samples.append((ops.dynamic_span_conv_backward.default, (grad, values.detach(), logits.detach(), heads)))
        prefix = torch.randn(batch, heads, seq_len, 3, generator=gen).to(device).transpose(1, 2)
        samples.append((ops.dynamic_span_conv_concat.default, (prefix.requires_grad_(), values, logits, heads)))
        if hasattr(ops, "dynamic_span_conv_into"):
            wide = torch.zeros(batch, seq_len, 2 * values.shape[-1], device=device)
            into_args = (values.detach(), logits.detach(), heads, wide[..., values.shape[-1] :])
            samples.append((ops.dynamic_span_conv_into.default, into_args))
    return samples


@pytest.mark.parametrize("namespace,device", NAMESPACE_DEVICES)
def test_opcheck_every_sample(namespace, device, rng):
    opcheck(opcheck_samples(namespace, device, rng), namespace, device)


@pytest.mark.parametrize("device", DEVICES)
def test_span_conv_writes_into_a_strided_slice(device, rng):
    values, logits = on(device, span_inputs(2, 13, 3, 16, 9, gen=rng))
    context = torch.zeros(2, 13, 96, device=device)  # [attention half | conv half]
    torch.ops.convbert_fast.dynamic_span_conv_into(values, logits, 3, context[..., 48:])
    torch.testing.assert_close(context[..., 48:], dynamic_span_conv_ref(values, logits, 3))
    assert context[..., :48].abs().max() == 0  # the attention half is untouched


# --- low precision against an fp32 oracle, and the proof that this test catches broken kernels -------------------


def check_span_conv_low_precision(op, dtype, device, gen):
    """`op` on bf16/fp16 inputs against the reference in fp32 on the same inputs, within the dtype's bound (the
    body of the test below, and of the test that runs it on broken copies of the op)."""
    values, logits = on(device, span_inputs(2, 40, 4, 32, 9, dtype, gen))
    out = op(values, logits, 4)
    oracle = dynamic_span_conv_ref(values.float(), logits.float(), 4)
    magnitude = dynamic_span_conv_ref(values.float().abs(), logits.float(), 4)  # softmax weights are >= 0
    assert_within_dtype_bound(out, oracle, magnitude)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_dynamic_span_conv_low_precision_within_the_dtype_bound(backend_device, dtype, rng):
    check_span_conv_low_precision(cf.ops.dynamic_span_conv, dtype, backend_device[1], rng)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("broken", [shifted_window_copy, scaled_copy], ids=["window-shifted-by-one", "scaled-by-1.1"])
def test_dynamic_span_conv_low_precision_test_fails_on_a_broken_copy(device_name, dtype, broken, rng):
    with pytest.raises(AssertionError, match="exceeds its bound"):
        check_span_conv_low_precision(broken(cf.ops.dynamic_span_conv), dtype, device_name, rng)


# --- the C++ ops called directly: every tensor argument checked at the boundary ----------------------------------


def _span_direct_calls(device, gen):
    ops = torch.ops.convbert_fast
    values, logits = on(device, span_inputs(2, 8, 2, 4, 3, gen=gen))
    grad = torch.randn(values.shape, generator=gen).to(device)
    prefix = torch.randn(2, 8, 5, generator=gen).to(device)
    out = torch.zeros(2, 8, 16, device=device)[..., 8:]  # a strided slice, as the model passes
    return {
        "forward": (ops.dynamic_span_conv.default, (values, logits, 2)),
        "into": (ops.dynamic_span_conv_into.default, (values, logits, 2, out)),
        "concat": (ops.dynamic_span_conv_concat.default, (prefix, values, logits, 2)),
        "backward": (ops.dynamic_span_conv_backward.default, (grad, values, logits, 2)),
    }


@pytest.mark.parametrize("which", ["forward", "into", "concat", "backward"])
def test_dynamic_span_conv_direct_calls_check_every_tensor(device_name, which, rng):
    assert_every_tensor_argument_checked(*_span_direct_calls(device_name, rng)[which], device_name)


# (which call, argument index, the bad argument from the good one, message)
SPAN_BAD_SHAPES = [
    ("forward", 0, lambda t: t[0], r"values must be \[B, L, H\*D\]"),
    ("forward", 1, lambda t: t[:, :7], r"kernel_logits must be \[B, L, H\*K\] with values' B and L"),
    ("forward", 1, lambda t: torch.cat([t, t[..., :2]], -1), "K must be odd"),
    ("forward", 2, lambda n: 3, "num_heads must divide"),
    ("forward", 2, lambda n: 0, "num_heads must be >= 1"),
    ("into", 3, lambda t: torch.zeros(2, 8, 9, device=t.device), r"out must be \[2, 8, 8\]"),
    ("into", 3, lambda t: t.new_zeros(200).as_strided((2, 8, 8), (64, 4, 1)), "rows overlap each other"),
    ("into", 3, lambda t: t.new_zeros(2, 8, 16)[..., ::2], "last dimension must be dense"),
    ("concat", 0, lambda t: t[:1], r"prefix must be \[2, 8, \.\.\.\]"),
    ("backward", 0, lambda t: t[..., :7], r"grad_out must be \[2, 8, 8\]"),
]


@pytest.mark.parametrize("which,index,make_bad,fragment", SPAN_BAD_SHAPES)
def test_dynamic_span_conv_direct_calls_refuse_bad_shapes(device_name, which, index, make_bad, fragment, rng):
    assert_refuses(_span_direct_calls(device_name, rng)[which], index, make_bad, ValueError, fragment)


def test_dynamic_span_conv_into_refuses_an_out_that_overlaps_an_input(device_name, rng):
    """out = values itself, and out and kernel_logits as overlapping views of one buffer: the kernel would read
    what it writes."""
    op, (values, logits, heads, _) = _span_direct_calls(device_name, rng)["into"]
    with pytest.raises(ValueError, match="out overlaps values"):
        op(values, logits, heads, values)
    shared = torch.zeros(2, 8, 12, device=device_name)
    shared[..., :6] = logits
    with pytest.raises(ValueError, match="out overlaps kernel_logits"):
        op(values, shared[..., :6], heads, shared[..., 4:12])
