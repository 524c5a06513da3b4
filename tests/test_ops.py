"""The three ops: eager backend against independent reference math, gradients, argument checks, backend API."""

from __future__ import annotations

import math
import os

import pytest
import torch
from reference import (
    assert_within_torch_error,
    dynamic_span_conv_ref,
    grouped_linear_ref,
    layer_norm_ref,
    separable_conv1d_ref,
)

import convbert_fast as cf
from convbert_fast.ops import backend

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


# --- the parametrised suite: every backend on every device, against the independent reference ---------------------

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
BACKEND_DEVICES = [
    pytest.param(("eager", "cpu"), id="eager-cpu"),
    pytest.param(("cpp", "cpu"), id="cpp-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu"),  # the interpreter (tests/conftest.py sets it)
    pytest.param(("eager", "cuda"), id="eager-cuda", marks=NO_GPU),
    pytest.param(("cpp", "cuda"), id="cpp-cuda", marks=NO_GPU),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=NO_GPU),
]
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    name, device = request.param
    with cf.use_backend(name):
        yield name, device


# (batch, seq_len, heads, head_size, kernel_size): L = 1, L < K, L not a multiple of any tile, B = 0,
# heads 1..12, D in {16, 48, 64, 128}, K in {1, 3, 5, 9, 15, 31, 63}
SPAN_CASES = [
    (2, 16, 4, 16, 9),
    (1, 1, 2, 16, 9),
    (2, 5, 3, 48, 9),
    (1, 37, 12, 16, 15),
    (0, 8, 2, 16, 3),
    (2, 20, 1, 128, 31),
    (1, 9, 6, 64, 5),
    (2, 13, 8, 16, 1),
    (1, 70, 2, 16, 63),
]
# (batch, seq_len, channels, out_channels, kernel_size)
SEPARABLE_CASES = [
    (2, 16, 32, 16, 9),
    (1, 1, 8, 8, 9),
    (2, 5, 48, 24, 9),
    (0, 8, 8, 4, 3),
    (1, 37, 24, 12, 15),
    (2, 20, 16, 16, 31),
    (1, 9, 8, 4, 1),
    (1, 70, 8, 8, 63),
]
# (leading shape, groups, group_in, group_out)
GROUPED_CASES = [((2, 16), 2, 16, 32), ((7,), 4, 3, 5), ((2, 3, 4), 1, 8, 8), ((0, 5), 2, 4, 4), ((3, 17), 2, 48, 192)]


def on(device, tensors):
    return [t.to(device) for t in tensors]


def strided(t):
    """The same values with a stride of 2 in the last dimension."""
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


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
    values, logits = on(device, span_inputs(2, 11, 3, 16, 9, gen=rng))
    expected = dynamic_span_conv_ref(values, logits, 3)
    torch.testing.assert_close(cf.ops.dynamic_span_conv(strided(values), strided(logits), 3), expected)
    x, dw, pw, bias = on(device, separable_inputs(2, 11, 8, 6, 5, gen=rng))
    expected = separable_conv1d_ref(x, dw, pw, bias)
    torch.testing.assert_close(cf.ops.separable_conv1d(strided(x), strided(dw), strided(pw), strided(bias)), expected)
    x, weight, bias = on(device, grouped_inputs((2, 11), 2, 4, 3, gen=rng))
    expected = grouped_linear_ref(x, weight, bias)
    torch.testing.assert_close(cf.ops.grouped_linear(strided(x), strided(weight), strided(bias)), expected)


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


def test_bias_may_be_flat_or_column(backend_device, rng):
    _, device = backend_device
    x, dw, pw, bias = on(device, separable_inputs(2, 8, 4, 6, 3, gen=rng))
    torch.testing.assert_close(cf.ops.separable_conv1d(x, dw, pw, bias), cf.ops.separable_conv1d(x, dw, pw, bias[:, 0]))


# --- gradients ----------------------------------------------------------------------------------------------------


def _requiring_grad(tensors, device="cpu"):
    return tuple(t.double().to(device).requires_grad_() for t in tensors)


def gradcheck(backend_device, fn, inputs):
    """fp64 gradcheck; in Triton's interpreter (slow per call) its fast mode, which checks the Jacobian along
    random directions instead of column by column."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=backend_device == ("triton", "cpu"))


@pytest.mark.parametrize("kernel_size", [1, 3, 9])
def test_separable_conv1d_gradcheck(backend_device, kernel_size, rng):
    inputs = _requiring_grad(separable_inputs(2, 6, 3, 4, kernel_size, gen=rng), backend_device[1])
    assert gradcheck(backend_device, cf.ops.separable_conv1d, inputs)


def test_separable_conv1d_with_multiplier_gradcheck(backend_device, rng):
    inputs = _requiring_grad(
        (*separable_inputs(2, 6, 3, 4, 3, gen=rng), torch.randn(2, 6, 4, generator=rng)), backend_device[1]
    )
    assert gradcheck(backend_device, lambda *a: cf.ops.separable_conv1d(*a[:4], multiplier=a[4]), inputs)


@pytest.mark.parametrize("kernel_size,seq_len", [(1, 4), (3, 6), (9, 5)])
def test_dynamic_span_conv_gradcheck(backend_device, kernel_size, seq_len, rng):
    values, logits = _requiring_grad(span_inputs(2, seq_len, 2, 3, kernel_size, gen=rng), backend_device[1])
    assert gradcheck(backend_device, lambda v, k: cf.ops.dynamic_span_conv(v, k, 2), (values, logits))


def test_dynamic_span_conv_after_a_prefix_gradcheck(backend_device, rng):
    _, device = backend_device
    values, logits = _requiring_grad(double(span_inputs(2, 5, 2, 3, 3, gen=rng)), device)
    prefix = torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=rng).to(device).transpose(1, 2).requires_grad_()
    assert gradcheck(
        backend_device, lambda p, v, k: cf.ops.dynamic_span_conv(v, k, 2, prefix=p), (prefix, values, logits)
    )


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_linear_gradcheck(backend_device, groups, activation, rng):
    inputs = _requiring_grad(grouped_inputs((2, 3), groups, 2, 3, gen=rng), backend_device[1])
    assert gradcheck(backend_device, lambda *a: cf.ops.grouped_linear(*a, activation=activation), inputs)


OPS_WITH_REFERENCE = [
    ("separable_conv1d", lambda g: separable_inputs(2, 7, 5, 6, 9, torch.float64, g), separable_conv1d_ref),
    (
        "dynamic_span_conv",
        lambda g: span_inputs(2, 7, 2, 3, 9, torch.float64, g),
        lambda v, k: dynamic_span_conv_ref(v, k, 2),
    ),
    ("grouped_linear", lambda g: grouped_inputs((2, 7), 2, 3, 4, torch.float64, g), grouped_linear_ref),
]


def _op(name):
    return (lambda v, k: cf.ops.dynamic_span_conv(v, k, 2)) if name == "dynamic_span_conv" else getattr(cf.ops, name)


@pytest.mark.parametrize("op,make,ref", OPS_WITH_REFERENCE, ids=[o[0] for o in OPS_WITH_REFERENCE])
def test_gradients_match_reference(backend_device, op, make, ref, rng):
    """Gradients of every input against autograd through the reference math, fp64."""
    inputs = [t.to(backend_device[1]).requires_grad_() for t in make(rng)]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, ref_out = _op(op)(*inputs), ref(*ref_inputs)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=rng).to(out.device)
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref_out, ref_inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op,make,ref", OPS_WITH_REFERENCE, ids=[o[0] for o in OPS_WITH_REFERENCE])
def test_gradients_for_only_some_inputs(backend_device, op, make, ref, rng):
    inputs = [t.to(backend_device[1]) for t in make(rng)]
    for wanted in range(len(inputs)):
        leaves = [t.detach().clone().requires_grad_(i == wanted) for i, t in enumerate(inputs)]
        ref_leaves = [t.detach().clone().requires_grad_(i == wanted) for i, t in enumerate(inputs)]
        _op(op)(*leaves).sum().backward()
        ref(*ref_leaves).sum().backward()
        for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
            if i == wanted:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)
            else:
                assert a.grad is None


@pytest.mark.parametrize("op,make,ref", OPS_WITH_REFERENCE, ids=[o[0] for o in OPS_WITH_REFERENCE])
def test_backward_is_bitwise_repeatable(backend_device, op, make, ref, rng):
    inputs = [t.float().to(backend_device[1]) for t in make(rng)]
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        _op(op)(*leaves).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


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
    (
        "two devices",
        lambda: cf.ops.dynamic_span_conv(_span()[0], _span()[1].to("meta"), 2),
        ValueError,
        "`values` is on cpu, `kernel_logits` on meta",
    ),
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


# --- the cpp ops as torch.library custom ops ----------------------------------------------------------------------

CPP_DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def _opcheck_samples(device, gen):
    """(op overload, args) for every op, forward and backward, over the shapes of the parametrised suite.
    Empty batches are left to the value tests: opcheck's schema check cannot allocate for a zero-size tensor."""
    ops = torch.ops.convbert_fast
    samples = []
    for batch, seq_len, heads, head_size, kernel_size in SPAN_CASES[:6]:
        if batch == 0:
            continue
        values, logits = on(device, span_inputs(batch, seq_len, heads, head_size, kernel_size, gen=gen))
        samples.append((ops.dynamic_span_conv.default, (values.requires_grad_(), logits.requires_grad_(), heads)))
        grad = torch.randn(values.shape, generator=gen).to(device)
        samples.append((ops.dynamic_span_conv_backward.default, (grad, values.detach(), logits.detach(), heads)))
        wide = torch.zeros(batch, seq_len, 2 * values.shape[-1], device=device)
        prefix = torch.randn(batch, heads, seq_len, 3, generator=gen).to(device).transpose(1, 2)
        samples.append((ops.dynamic_span_conv_concat.default, (prefix.requires_grad_(), values, logits, heads)))
        samples.append(
            (
                ops.dynamic_span_conv_into.default,
                (values.detach(), logits.detach(), heads, wide[..., values.shape[-1] :]),
            )
        )
    for batch, seq_len, channels, out_channels, kernel_size in SEPARABLE_CASES[:6]:
        if batch == 0:
            continue
        inputs = on(device, separable_inputs(batch, seq_len, channels, out_channels, kernel_size, gen=gen))
        samples.append((ops.separable_conv1d.default, tuple(t.requires_grad_() for t in inputs)))
        grad = torch.randn(batch, seq_len, out_channels, generator=gen).to(device)
        samples.append((ops.separable_conv1d_backward.default, (grad, *(t.detach() for t in inputs))))
    for leading, groups, group_in, group_out in GROUPED_CASES:
        if 0 in leading:
            continue
        inputs = on(device, grouped_inputs(leading, groups, group_in, group_out, gen=gen))
        samples.append((ops.grouped_linear.default, tuple(t.requires_grad_() for t in inputs)))
        samples.append((ops.grouped_linear_gelu.default, tuple(t.detach().requires_grad_() for t in inputs)))
        grad = torch.randn(*leading, groups * group_out, generator=gen).to(device)
        samples.append((ops.grouped_linear_backward.default, (grad, inputs[0].detach(), inputs[1].detach())))
    return samples


@pytest.mark.parametrize("device", CPP_DEVICES)
def test_opcheck_every_sample(device, rng):
    """Schema, fake-tensor, autograd-registration and AOT-dispatch checks of torch.library, on every sample."""
    for op, args in _opcheck_samples(device, rng):
        torch.library.opcheck(op, args)


def _triton_opcheck_samples(device, gen):
    ops = torch.ops.convbert_fast_triton
    samples = []
    for batch, seq_len, heads, head_size, kernel_size in SPAN_CASES[:4]:
        values, logits = on(device, span_inputs(batch, seq_len, heads, head_size, kernel_size, gen=gen))
        samples.append((ops.dynamic_span_conv.default, (values.requires_grad_(), logits.requires_grad_(), heads)))
        grad = torch.randn(values.shape, generator=gen).to(device)
        samples.append((ops.dynamic_span_conv_backward.default, (grad, values.detach(), logits.detach(), heads)))
        prefix = torch.randn(batch, heads, seq_len, 3, generator=gen).to(device).transpose(1, 2)
        samples.append((ops.dynamic_span_conv_concat.default, (prefix.requires_grad_(), values, logits, heads)))
    for batch, seq_len, channels, out_channels, kernel_size in SEPARABLE_CASES[:3]:
        inputs = on(device, separable_inputs(batch, seq_len, channels, out_channels, kernel_size, gen=gen))
        multiplier = torch.randn(batch, seq_len, out_channels, generator=gen).to(device)
        samples.append((ops.separable_conv1d.default, tuple(t.requires_grad_() for t in inputs)))
        samples.append(
            (ops.separable_conv1d_mul.default, tuple(t.detach().requires_grad_() for t in (*inputs, multiplier)))
        )
        grad = torch.randn(batch, seq_len, out_channels, generator=gen).to(device)
        samples.append((ops.separable_conv1d_backward.default, (grad, *(t.detach() for t in inputs))))
    for leading, groups, group_in, group_out in GROUPED_CASES[:3]:
        inputs = on(device, grouped_inputs(leading, groups, group_in, group_out, gen=gen))
        samples.append((ops.grouped_linear.default, tuple(t.requires_grad_() for t in inputs)))
        samples.append((ops.grouped_linear_gelu.default, tuple(t.detach().requires_grad_() for t in inputs)))
        grad = torch.randn(*leading, groups * group_out, generator=gen).to(device)
        samples.append((ops.grouped_linear_backward.default, (grad, inputs[0].detach(), inputs[1].detach())))
    return samples


@pytest.mark.parametrize("device", CPP_DEVICES)
def test_opcheck_every_triton_sample(device, rng):
    """The same checks for the Triton ops. The interpreter cannot run a kernel on the fake tensors of AOT
    dispatch, so on the CPU that one check is left to the GPU run (tools/gpu_check.sh)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if device == "cuda" or not INTERPRETED:
        utils += ("test_aot_dispatch_dynamic",)
    for op, args in _triton_opcheck_samples(device, rng):
        torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize("device", CPP_DEVICES)
def test_span_conv_writes_into_a_strided_slice(device, rng):
    values, logits = on(device, span_inputs(2, 13, 3, 16, 9, gen=rng))
    context = torch.zeros(2, 13, 96, device=device)  # [attention half | conv half]
    torch.ops.convbert_fast.dynamic_span_conv_into(values, logits, 3, context[..., 48:])
    torch.testing.assert_close(context[..., 48:], dynamic_span_conv_ref(values, logits, 3))
    assert context[..., :48].abs().max() == 0  # the attention half is untouched


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
    from convbert_fast.ops.triton import grouped_linear, separable_conv

    launches = []

    class Record:  # stands in for wrap_triton(kernel): kernel[grid](*args, **kwargs) is logged, not run
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    for module in (grouped_linear, separable_conv):
        monkeypatch.setattr(module, "wrap_triton", lambda kernel: Record())
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            grouped_linear.grouped_linear_triton_op(*grouped_inputs((2, 3), 2, 4, 4, dtype))
            separable_conv.separable_conv1d_triton_op(*separable_inputs(1, 5, 4, 4, 3, dtype))
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


def _simulate_unavailable(monkeypatch, name, reason):
    monkeypatch.setattr(backend, "_unavailable_reason", {**backend._unavailable_reason, name: reason})


def test_auto_picks_cpp_on_cpu(rng):
    from convbert_fast.ops.separable_conv import separable_conv1d_cpp

    assert backend.implementation("separable_conv1d", torch.device("cpu")) is separable_conv1d_cpp


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


@NO_GPU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
def test_full_shapes_on_gpu(backend_name, dtype, rng):
    """ConvBERT-base shapes (L=512, 6 conv heads of 64, C=768, K=9) and medium-small's FFN, forward and backward,
    within the low-precision rule against the fp64 oracle."""
    device = "cuda"
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


# dropout_add_layer_norm: the C++ extension's fused end of each sublayer (CPU and CUDA; no Triton kernel)

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=NO_GPU)]


def norm_inputs(rows, channels, dtype, device, gen):
    x, residual = randn(*rows, channels, gen=gen), randn(*rows, channels, gen=gen)
    weight, bias = 1 + 0.1 * randn(channels, gen=gen), 0.1 * randn(channels, gen=gen)
    return [t.to(device, dtype) for t in (x, residual, weight, bias)]


def kept_mask(shape, p, seed, device):
    """The op's own mask, read back: with x = 1, residual = 0, weight = 1, bias = 0 a dropped element is the
    row's minimum (h = 0 against h = 1 / (1 - p)), so it normalises to a negative value."""
    ones = torch.ones(shape, dtype=torch.float64, device=device)
    unit, zero = (
        torch.ones(shape[-1], dtype=torch.float64, device=device),
        torch.zeros(shape[-1], dtype=torch.float64, device=device),
    )
    out = torch.ops.convbert_fast.dropout_add_layer_norm(ones, torch.zeros_like(ones), unit, zero, p, 1e-5, seed)[0]
    return out > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,channels", [((2, 7), 96), ((1, 1), 1), ((3,), 768), ((0, 4), 16), ((2, 5), 1000)])
def test_dropout_add_layer_norm_without_dropout_matches_reference(device_name, dtype, rows, channels, rng):
    x, residual, weight, bias = norm_inputs(rows, channels, dtype, device_name, rng)
    out = cf.ops.dropout_add_layer_norm(x, residual, weight, bias, p=0.1, eps=1e-5, training=False)
    assert out.shape == x.shape and out.dtype == dtype
    if out.numel():
        oracle = layer_norm_ref(*(t.double() for t in (x + residual, weight, bias)), 1e-5)
        torch_result = torch.nn.functional.layer_norm(x + residual, (channels,), weight, bias, 1e-5)
        assert_within_torch_error(out, torch_result, oracle)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_add_layer_norm_drops_with_probability_p_and_scales_the_rest(device_name, p, rng):
    x, residual, weight, bias = norm_inputs((64, 32), 256, torch.float64, device_name, rng)
    seed = torch.tensor(2024)
    keep = kept_mask(x.shape, p, seed, device_name)
    # 524288 draws: the dropped fraction is within 5 standard deviations of p
    assert abs((~keep).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    out = torch.ops.convbert_fast.dropout_add_layer_norm(x, residual, weight, bias, p, 1e-5, seed)[0]
    expected = layer_norm_ref(torch.where(keep, x / (1 - p), 0) + residual, weight, bias, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    other = torch.ops.convbert_fast.dropout_add_layer_norm(x, residual, weight, bias, p, 1e-5, torch.tensor(2025))[0]
    assert not torch.equal(out, other)  # another seed, another mask


def test_dropout_add_layer_norm_is_reproducible_from_torch_manual_seed(device_name, rng):
    inputs = norm_inputs((4, 8), 64, torch.float32, device_name, rng)
    torch.manual_seed(7)
    first = cf.ops.dropout_add_layer_norm(*inputs, p=0.2, training=True)
    torch.manual_seed(7)
    assert torch.equal(cf.ops.dropout_add_layer_norm(*inputs, p=0.2, training=True), first)
    assert not torch.equal(cf.ops.dropout_add_layer_norm(*inputs, p=0.2, training=True), first)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_add_layer_norm_gradcheck(device_name, p, rng):
    inputs = _requiring_grad(norm_inputs((2, 3), 5, torch.float64, device_name, rng))
    seed = torch.tensor(99)
    op = torch.ops.convbert_fast.dropout_add_layer_norm
    assert torch.autograd.gradcheck(lambda *a: op(*a, p, 1e-5, seed)[0], inputs)


def test_dropout_add_layer_norm_gradients_match_reference_under_the_same_mask(device_name, rng):
    inputs = _requiring_grad(norm_inputs((3, 4), 48, torch.float64, device_name, rng))
    seed, p = torch.tensor(5), 0.25
    keep = kept_mask(inputs[0].shape, p, seed, device_name)
    grad = torch.randn(inputs[0].shape, dtype=torch.float64, generator=rng).to(device_name)
    ours = torch.autograd.grad(torch.ops.convbert_fast.dropout_add_layer_norm(*inputs, p, 1e-5, seed)[0], inputs, grad)
    x, residual, weight, bias = inputs
    reference = layer_norm_ref(torch.where(keep, x / (1 - p), 0) + residual, weight, bias, 1e-5)
    for a, b in zip(ours, torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dropout_add_layer_norm_opcheck(device_name, rng):
    ops = torch.ops.convbert_fast
    for rows, channels, p in [((2, 7), 96, 0.1), ((3,), 16, 0.0)]:
        x, residual, weight, bias = norm_inputs(rows, channels, torch.float32, device_name, rng)
        seed = torch.tensor(11)
        args = (x.requires_grad_(), residual.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
        torch.library.opcheck(ops.dropout_add_layer_norm.default, (*args, p, 1e-5, seed))
        _, mean, rstd = ops.dropout_add_layer_norm(*(t.detach() for t in args), p, 1e-5, seed)
        grad = torch.randn(x.shape, generator=rng).to(device_name)
        backward_args = (grad, x.detach(), residual.detach(), weight.detach(), mean, rstd, p, seed)
        torch.library.opcheck(ops.dropout_add_layer_norm_backward.default, backward_args)


@pytest.mark.parametrize(
    "change,fragment",
    [
        (dict(p=1.5), r"`p` must be in \[0, 1\]"),
        (dict(residual=torch.zeros(2, 3, 9)), r"`residual` must have shape \[2, 3, 8\]"),
        (dict(weight=torch.ones(9)), r"`weight` must have shape \[8\]"),
        (dict(x=torch.zeros(2, 3, 0), residual=torch.zeros(2, 3, 0)), "non-empty last dimension"),
    ],
)
def test_dropout_add_layer_norm_bad_arguments(change, fragment):
    args = dict(x=torch.zeros(2, 3, 8), residual=torch.zeros(2, 3, 8), weight=torch.ones(8), bias=torch.zeros(8))
    args.update(change)
    with pytest.raises(ValueError, match=fragment):
        cf.ops.dropout_add_layer_norm(**args)


@pytest.fixture(params=DEVICES)
def device_name(request):
    return request.param
