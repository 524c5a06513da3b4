"""The three ops: eager backend against independent reference math, gradients, argument checks, backend API."""

from __future__ import annotations

import pytest
import torch

import convbert_fast as cf
from convbert_fast.ops import backend
from reference import assert_within_torch_error, dynamic_span_conv_ref, grouped_linear_ref, separable_conv1d_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def separable_inputs(batch, seq_len, channels, out_channels, kernel_size, dtype=torch.float32, gen=None):
    return (
        randn(batch, seq_len, channels, dtype=dtype, gen=gen),
        randn(channels, 1, kernel_size, dtype=dtype, scale=0.3, gen=gen),
        randn(out_channels, channels, 1, dtype=dtype, scale=0.3, gen=gen),
        randn(out_channels, 1, dtype=dtype, gen=gen),
    )


def span_inputs(batch, seq_len, heads, head_size, kernel_size, dtype=torch.float32, gen=None):
    return (
        randn(batch, seq_len, heads * head_size, dtype=dtype, gen=gen),
        randn(batch, seq_len, heads * kernel_size, dtype=dtype, scale=2.0, gen=gen),
    )


def grouped_inputs(leading, groups, group_in, group_out, dtype=torch.float32, gen=None):
    return (
        randn(*leading, groups * group_in, dtype=dtype, gen=gen),
        randn(groups, group_in, group_out, dtype=dtype, scale=0.3, gen=gen),
        randn(groups * group_out, dtype=dtype, gen=gen),
    )


def double(tensors):
    return [t.double() for t in tensors]


# --- values against the independent reference -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,seq_len,channels,out_channels,kernel_size",
    [(2, 16, 32, 16, 9), (1, 5, 8, 8, 3), (3, 1, 4, 6, 5), (2, 3, 8, 4, 9), (1, 7, 6, 6, 1), (1, 40, 8, 8, 63)],
)
def test_separable_conv1d_matches_reference(dtype, batch, seq_len, channels, out_channels, kernel_size, rng):
    inputs = separable_inputs(batch, seq_len, channels, out_channels, kernel_size, dtype, rng)
    out = cf.ops.separable_conv1d(*inputs)
    assert out.shape == (batch, seq_len, out_channels) and out.dtype == dtype
    oracle = separable_conv1d_ref(*double(inputs))
    assert_within_torch_error(out, separable_conv1d_ref(*inputs), oracle)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,seq_len,heads,head_size,kernel_size",
    [(2, 16, 4, 8, 9), (1, 5, 1, 4, 3), (2, 3, 2, 4, 9), (1, 1, 2, 3, 5), (3, 9, 3, 2, 1), (1, 70, 2, 4, 63)],
)
def test_dynamic_span_conv_matches_reference(dtype, batch, seq_len, heads, head_size, kernel_size, rng):
    values, logits = span_inputs(batch, seq_len, heads, head_size, kernel_size, dtype, rng)
    out = cf.ops.dynamic_span_conv(values, logits, heads)
    assert out.shape == values.shape and out.dtype == dtype
    oracle = dynamic_span_conv_ref(values.double(), logits.double(), heads)
    assert_within_torch_error(out, dynamic_span_conv_ref(values, logits, heads), oracle)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "leading,groups,group_in,group_out", [((2, 16), 2, 16, 32), ((7,), 4, 3, 5), ((2, 3, 4), 1, 8, 8), ((1, 1), 3, 2, 2)]
)
def test_grouped_linear_matches_reference(dtype, leading, groups, group_in, group_out, rng):
    inputs = grouped_inputs(leading, groups, group_in, group_out, dtype, rng)
    out = cf.ops.grouped_linear(*inputs)
    assert out.shape == (*leading, groups * group_out) and out.dtype == dtype
    oracle = grouped_linear_ref(*double(inputs))
    assert_within_torch_error(out, grouped_linear_ref(*inputs), oracle)


def test_span_conv_is_zero_padded_at_both_ends():
    """With all weight on the farthest left offset, token t reads token t - (K-1)/2, and zeros before 0."""
    kernel_size, seq_len = 5, 6
    values = torch.arange(1.0, seq_len + 1).reshape(1, seq_len, 1)
    logits = torch.full((1, seq_len, kernel_size), -1e4)
    logits[..., 0] = 0.0
    out = cf.ops.dynamic_span_conv(values, logits, 1).flatten()
    assert out.tolist() == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_bias_may_be_flat_or_column(rng):
    x, dw, pw, bias = separable_inputs(2, 8, 4, 6, 3, gen=rng)
    torch.testing.assert_close(cf.ops.separable_conv1d(x, dw, pw, bias), cf.ops.separable_conv1d(x, dw, pw, bias[:, 0]))


# --- gradients ----------------------------------------------------------------------------------------------------


def _requiring_grad(tensors):
    return tuple(t.double().requires_grad_() for t in tensors)


@pytest.mark.parametrize("kernel_size", [1, 3, 9])
def test_separable_conv1d_gradcheck(kernel_size, rng):
    inputs = _requiring_grad(separable_inputs(2, 6, 3, 4, kernel_size, gen=rng))
    assert torch.autograd.gradcheck(cf.ops.separable_conv1d, inputs)


@pytest.mark.parametrize("kernel_size,seq_len", [(1, 4), (3, 6), (9, 5)])
def test_dynamic_span_conv_gradcheck(kernel_size, seq_len, rng):
    values, logits = _requiring_grad(span_inputs(2, seq_len, 2, 3, kernel_size, gen=rng))
    assert torch.autograd.gradcheck(lambda v, k: cf.ops.dynamic_span_conv(v, k, 2), (values, logits))


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_linear_gradcheck(groups, rng):
    inputs = _requiring_grad(grouped_inputs((2, 3), groups, 2, 3, gen=rng))
    assert torch.autograd.gradcheck(cf.ops.grouped_linear, inputs)


@pytest.mark.parametrize(
    "op,make,ref",
    [
        ("separable_conv1d", lambda g: separable_inputs(2, 7, 5, 6, 9, torch.float64, g), separable_conv1d_ref),
        ("dynamic_span_conv", lambda g: span_inputs(2, 7, 2, 3, 9, torch.float64, g), lambda v, k: dynamic_span_conv_ref(v, k, 2)),
        ("grouped_linear", lambda g: grouped_inputs((2, 7), 2, 3, 4, torch.float64, g), grouped_linear_ref),
    ],
)
def test_gradients_match_reference(op, make, ref, rng):
    """Gradients of every input against autograd through the reference math, fp64."""
    fn = getattr(cf.ops, op) if op != "dynamic_span_conv" else (lambda v, k: cf.ops.dynamic_span_conv(v, k, 2))
    inputs = [t.requires_grad_() for t in make(rng)]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, ref_out = fn(*inputs), ref(*ref_inputs)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=rng)
    ours = torch.autograd.grad(out, inputs, grad)
    theirs = torch.autograd.grad(ref_out, ref_inputs, grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --- argument checks ----------------------------------------------------------------------------------------------


def _sep():
    return separable_inputs(2, 8, 4, 6, 3)


def _span():
    return span_inputs(2, 8, 2, 4, 3)


def _grp():
    return grouped_inputs((2, 8), 2, 4, 3)


BAD_CALLS = [
    # (description, call, exception, message fragment)
    ("x not a tensor", lambda: cf.ops.separable_conv1d([1.0], *_sep()[1:]), TypeError, "`x` must be a torch.Tensor"),
    ("integer x", lambda: cf.ops.separable_conv1d(_sep()[0].long(), *_sep()[1:]), TypeError, "floating-point"),
    ("x 2-D", lambda: cf.ops.separable_conv1d(_sep()[0][0], *_sep()[1:]), ValueError, "`x` must have shape"),
    ("depthwise channels", lambda: cf.ops.separable_conv1d(_sep()[0], torch.randn(5, 1, 3), *_sep()[2:]), ValueError, "depthwise_weight"),
    ("even K", lambda: cf.ops.separable_conv1d(_sep()[0], torch.randn(4, 1, 4), *_sep()[2:]), ValueError, "must be odd"),
    ("pointwise", lambda: cf.ops.separable_conv1d(*_sep()[:2], torch.randn(6, 5, 1), _sep()[3]), ValueError, "pointwise_weight"),
    ("bias", lambda: cf.ops.separable_conv1d(*_sep()[:3], torch.randn(7)), ValueError, "`bias`"),
    ("mixed dtypes", lambda: cf.ops.separable_conv1d(_sep()[0].double(), *_sep()[1:]), TypeError, "share one dtype"),
    ("num_heads float", lambda: cf.ops.dynamic_span_conv(*_span(), 2.0), TypeError, "`num_heads` must be an int"),
    ("num_heads 0", lambda: cf.ops.dynamic_span_conv(*_span(), 0), ValueError, "at least 1"),
    ("heads do not divide A", lambda: cf.ops.dynamic_span_conv(*_span(), 3), ValueError, "not divisible by num_heads"),
    ("even span", lambda: cf.ops.dynamic_span_conv(_span()[0], torch.randn(2, 8, 8), 2), ValueError, "must be odd"),
    ("logits length", lambda: cf.ops.dynamic_span_conv(_span()[0], torch.randn(2, 7, 6), 2), ValueError, "`kernel_logits` must have shape"),
    ("values 2-D", lambda: cf.ops.dynamic_span_conv(_span()[0][0], _span()[1], 2), ValueError, "`values` must have shape"),
    ("weight 2-D", lambda: cf.ops.grouped_linear(_grp()[0], torch.randn(8, 6), _grp()[2]), ValueError, "`weight` must have shape"),
    ("x features", lambda: cf.ops.grouped_linear(torch.randn(2, 9), *_grp()[1:]), ValueError, "`x` must have shape [..., 8]"),
    ("bias size", lambda: cf.ops.grouped_linear(*_grp()[:2], torch.randn(5)), ValueError, "`bias` must have shape [6]"),
    ("int weight", lambda: cf.ops.grouped_linear(_grp()[0], _grp()[1].int(), _grp()[2]), TypeError, "`weight` must have a floating-point"),
]


@pytest.mark.parametrize("description,call,exc,fragment", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_clearly(description, call, exc, fragment):
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_mixed_dtypes_are_allowed_under_autocast(rng):
    x, weight, bias = grouped_inputs((2, 4), 2, 4, 3, gen=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cf.ops.grouped_linear(x.bfloat16(), weight, bias)
        expected = grouped_linear_ref(x.bfloat16(), weight, bias)
    # As in transformers: the matmul runs in bf16, the fp32 bias then promotes the sum to fp32.
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected)


# --- backend API --------------------------------------------------------------------------------------------------


def test_available_backends_reports_each_backend():
    status = cf.available_backends()
    assert set(status) == {"eager", "cpp", "triton"}
    assert status["eager"] == "ok"
    for name in ("cpp", "triton"):
        assert status[name] != "ok" and len(status[name]) > 10  # a reason, not a bare flag


def test_set_backend_rejects_unknown_and_unavailable():
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*'eager'"):
        cf.set_backend("cuda")
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available: "):
        cf.set_backend("cpp")
    assert cf.get_backend() == "auto"


def test_use_backend_scopes_and_restores():
    with cf.use_backend("eager"):
        assert cf.get_backend() == "eager"
        with pytest.raises(RuntimeError):
            with cf.use_backend("triton"):
                pass
        assert cf.get_backend() == "eager"
    assert cf.get_backend() == "auto"


def test_auto_warns_once_when_a_shipped_backend_failed(monkeypatch):
    """Simulate a backend that ships but failed to load: `auto` uses the next one and warns once."""
    monkeypatch.setattr(backend, "_unavailable_reason", {**backend._unavailable_reason, "cpp": "simulated: _C missing"})
    monkeypatch.setattr(backend, "_failed_to_load", {"cpp"})
    monkeypatch.setattr(backend, "_warned_fallback", set())
    x, weight, bias = grouped_inputs((2, 3), 2, 2, 2)
    with pytest.warns(RuntimeWarning, match="backend 'cpp' failed to load \\(simulated: _C missing\\)"):
        cf.ops.grouped_linear(x, weight, bias)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cf.ops.grouped_linear(x, weight, bias)  # second call: no warning
    with pytest.raises(RuntimeError, match="simulated: _C missing"):
        cf.set_backend("cpp")
