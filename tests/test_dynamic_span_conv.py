"""dynamic_span_conv on every backend and device: values against the independent reference, padding and NaN
spread, gradients, argument checks, and its kernels as torch.library ops (both namespaces)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, NAMESPACES, opcheck
from reference import (
    assert_backward_bitwise_repeatable,
    assert_gradients_for_only_some_inputs,
    assert_gradients_match,
    assert_within_torch_error,
    dynamic_span_conv_ref,
)
from samples import (
    DTYPES,
    SPAN_CASES,
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_opcheck_every_sample(namespace, device, rng):
    opcheck(opcheck_samples(namespace, device, rng), namespace, device)


@pytest.mark.parametrize("device", DEVICES)
def test_span_conv_writes_into_a_strided_slice(device, rng):
    values, logits = on(device, span_inputs(2, 13, 3, 16, 9, gen=rng))
    context = torch.zeros(2, 13, 96, device=device)  # [attention half | conv half]
    torch.ops.convbert_fast.dynamic_span_conv_into(values, logits, 3, context[..., 48:])
    torch.testing.assert_close(context[..., 48:], dynamic_span_conv_ref(values, logits, 3))
    assert context[..., :48].abs().max() == 0  # the attention half is untouched
