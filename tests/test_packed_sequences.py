"""The two convs on packed sequences (`cu_seqlens`), on every backend and device: each sequence of a packed row
gives what it gives alone, forward and backward, against the independent reference run one sequence at a time;
fp64 gradcheck; the kernels as torch.library ops with offsets; bad offsets refused with a ValueError naming them,
by every backend and by the C++ ops called directly."""

from __future__ import annotations

import pytest
import torch
from conftest import NAMESPACE_DEVICES, NO_GPU, TRITON_ON_CPU, opcheck
from reference import assert_within_torch_error, dynamic_span_conv_ref, separable_conv1d_ref
from samples import DTYPES, gradcheck, on, randn

import convbert_fast as cf

# Lengths of the packed sequences: an empty one, a single token, shorter than K, longer than K.
SPAN_PACKINGS = [  # (lengths, heads, head_size, kernel_size)
    ([5, 1, 0, 9, 3, 17], 2, 16, 9),
    ([13], 3, 48, 5),
    ([1, 1, 1], 1, 16, 3),
    ([2, 30, 4], 4, 64, 15),
    ([70, 40], 2, 16, 63),
]
SEPARABLE_PACKINGS = [  # (lengths, channels, out_channels, kernel_size)
    ([5, 1, 0, 9, 3, 17], 32, 16, 9),
    ([13], 24, 12, 3),
    ([1, 1, 1], 8, 8, 1),
    ([2, 30, 4], 48, 24, 15),
    ([70, 40], 8, 8, 63),
]


def offsets(lengths, device="cpu", dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=device)


def one_at_a_time(fn, lengths, *packed):
    """fn on each non-empty sequence's slice of the packed [1, T, ...] tensors, concatenated along T."""
    bounds = offsets(lengths).tolist()
    pieces = [fn(*(t[:, s:e] for t in packed)) for s, e in zip(bounds, bounds[1:]) if e > s]
    return torch.cat(pieces, dim=1)


def span_packed(lengths, heads, head_size, kernel_size, dtype=torch.float32, gen=None):
    total = sum(lengths)
    return (
        randn(1, total, heads * head_size, dtype=dtype, gen=gen),
        randn(1, total, heads * kernel_size, dtype=dtype, scale=2.0, gen=gen),
    )


def separable_packed(lengths, channels, out_channels, kernel_size, dtype=torch.float32, gen=None):
    total = sum(lengths)
    return (
        randn(1, total, channels, dtype=dtype, gen=gen),
        randn(channels, 1, kernel_size, dtype=dtype, scale=0.3, gen=gen),
        randn(out_channels, channels, 1, dtype=dtype, scale=0.3, gen=gen),
        randn(out_channels, dtype=dtype, gen=gen),
        randn(1, total, out_channels, dtype=dtype, gen=gen),  # the multiplier (ConvBERT's query)
    )


# --- values ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SPAN_PACKINGS, ids=lambda c: f"{c[0]}-K{c[3]}")
def test_span_conv_on_packed_sequences_matches_the_reference_per_sequence(backend_device, dtype, case, rng):
    _, device = backend_device
    lengths, heads = case[0], case[1]
    values, logits = on(device, span_packed(*case, dtype, rng))
    out = cf.ops.dynamic_span_conv(values, logits, heads, cu_seqlens=offsets(lengths, device))
    assert out.shape == values.shape and out.dtype == dtype

    def reference(v, k):
        return dynamic_span_conv_ref(v, k, heads)

    oracle = one_at_a_time(reference, lengths, values.double(), logits.double())
    assert_within_torch_error(out, one_at_a_time(reference, lengths, values, logits), oracle)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SEPARABLE_PACKINGS, ids=lambda c: f"{c[0]}-K{c[3]}")
def test_separable_conv_on_packed_sequences_matches_the_reference_per_sequence(backend_device, dtype, case, rng):
    _, device = backend_device
    lengths = case[0]
    x, depthwise, pointwise, bias, query = on(device, separable_packed(*case, dtype, rng))
    cu = offsets(lengths, device)
    out = cf.ops.separable_conv1d(x, depthwise, pointwise, bias, cu_seqlens=cu)
    fused = cf.ops.separable_conv1d(x, depthwise, pointwise, bias, multiplier=query, cu_seqlens=cu)
    assert out.shape == query.shape and out.dtype == dtype

    def reference(x_, *rest):
        return separable_conv1d_ref(x_, *rest)

    weights = (depthwise, pointwise, bias)
    oracle = one_at_a_time(lambda t: reference(t, *(w.double() for w in weights)), lengths, x.double())
    expected = one_at_a_time(lambda t: reference(t, *weights), lengths, x)
    assert_within_torch_error(out, expected, oracle)
    assert_within_torch_error(fused, expected * query, oracle * query.double())


@pytest.mark.parametrize("case", SPAN_PACKINGS[:4], ids=lambda c: f"{c[0]}-K{c[3]}")
def test_span_conv_packed_equals_each_sequence_alone_with_gradients(backend_device, case, rng):
    """The same backend on the packed row and on each sequence alone: outputs and every input's gradient (fp32)."""
    _, device = backend_device
    lengths, heads = case[0], case[1]
    values, logits = (t.requires_grad_() for t in on(device, span_packed(*case, gen=rng)))
    packed = cf.ops.dynamic_span_conv(values, logits, heads, cu_seqlens=offsets(lengths, device))
    alone = one_at_a_time(lambda v, k: cf.ops.dynamic_span_conv(v, k, heads), lengths, values, logits)
    torch.testing.assert_close(packed, alone)
    grad = torch.randn(packed.shape, generator=rng).to(device)
    for a, b in zip(
        torch.autograd.grad(packed, (values, logits), grad), torch.autograd.grad(alone, (values, logits), grad)
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", SEPARABLE_PACKINGS[:4], ids=lambda c: f"{c[0]}-K{c[3]}")
def test_separable_conv_packed_equals_each_sequence_alone_with_gradients(backend_device, case, rng):
    _, device = backend_device
    lengths = case[0]
    inputs = [t.requires_grad_() for t in on(device, separable_packed(*case, gen=rng))]
    x, depthwise, pointwise, bias, query = inputs
    packed = cf.ops.separable_conv1d(
        x, depthwise, pointwise, bias, multiplier=query, cu_seqlens=offsets(lengths, device)
    )

    def alone_fn(x_, query_):
        return cf.ops.separable_conv1d(x_, depthwise, pointwise, bias, multiplier=query_)

    alone = one_at_a_time(alone_fn, lengths, x, query)
    torch.testing.assert_close(packed, alone)
    grad = torch.randn(packed.shape, generator=rng).to(device)
    for a, b in zip(torch.autograd.grad(packed, inputs, grad), torch.autograd.grad(alone, inputs, grad)):
        torch.testing.assert_close(a, b)


def test_span_conv_after_a_prefix_on_packed_sequences(backend_device, rng):
    _, device = backend_device
    lengths, heads = [4, 0, 7, 2], 2
    values, logits = on(device, span_packed(lengths, heads, 8, 5, gen=rng))
    prefix = randn(1, heads, sum(lengths), 8, gen=rng).to(device).transpose(1, 2)
    out = cf.ops.dynamic_span_conv(values, logits, heads, prefix=prefix, cu_seqlens=offsets(lengths, device))
    assert torch.equal(out[..., :16], prefix.reshape(1, -1, 16))
    expected = one_at_a_time(lambda v, k: dynamic_span_conv_ref(v, k, heads), lengths, values, logits)
    torch.testing.assert_close(out[..., 16:], expected)


# --- gradients ---------------------------------------------------------------------------------------------------


def test_span_conv_on_packed_sequences_gradcheck(backend_device, rng):
    _, device = backend_device
    lengths = [3, 0, 1, 6]
    values, logits = (t.double().to(device).requires_grad_() for t in span_packed(lengths, 2, 3, 5, gen=rng))
    cu = offsets(lengths, device)
    assert gradcheck(backend_device, lambda v, k: cf.ops.dynamic_span_conv(v, k, 2, cu_seqlens=cu), (values, logits))


def test_separable_conv_on_packed_sequences_gradcheck(backend_device, rng):
    _, device = backend_device
    lengths = [3, 0, 1, 6]
    inputs = tuple(t.double().to(device).requires_grad_() for t in separable_packed(lengths, 4, 3, 3, gen=rng))
    cu = offsets(lengths, device)

    def fn(x, dw, pw, b, query):
        return cf.ops.separable_conv1d(x, dw, pw, b, multiplier=query, cu_seqlens=cu)

    assert gradcheck(backend_device, fn, inputs)


# --- the kernels as torch.library ops -----------------------------------------------------------------------------


def opcheck_samples(namespace, device, gen):
    ops = getattr(torch.ops, namespace)
    samples = []
    for lengths, heads, head_size, kernel_size in SPAN_PACKINGS[:2]:
        values, logits = on(device, span_packed(lengths, heads, head_size, kernel_size, gen=gen))
        cu = offsets(lengths, device)
        samples.append((ops.dynamic_span_conv.default, (values.requires_grad_(), logits.requires_grad_(), heads, cu)))
        grad = torch.randn(values.shape, generator=gen).to(device)
        samples.append((ops.dynamic_span_conv_backward.default, (grad, values.detach(), logits.detach(), heads, cu)))
        prefix = torch.randn(1, heads, values.shape[1], 3, generator=gen).to(device).transpose(1, 2)
        samples.append((ops.dynamic_span_conv_concat.default, (prefix.requires_grad_(), values, logits, heads, cu)))
        if hasattr(ops, "dynamic_span_conv_into"):
            wide = torch.zeros(1, values.shape[1], 2 * values.shape[-1], device=device)
            into_args = (values.detach(), logits.detach(), heads, wide[..., values.shape[-1] :], cu)
            samples.append((ops.dynamic_span_conv_into.default, into_args))
    for lengths, channels, out_channels, kernel_size in SEPARABLE_PACKINGS[:2]:
        x, depthwise, pointwise, bias, query = on(
            device, separable_packed(lengths, channels, out_channels, kernel_size, gen=gen)
        )
        weights = [t.requires_grad_() for t in (depthwise, pointwise, bias)]
        cu = offsets(lengths, device)
        samples.append((ops.separable_conv1d.default, (x.requires_grad_(), *weights, cu)))
        grad = torch.randn(query.shape, generator=gen).to(device)
        samples.append((ops.separable_conv1d_backward.default, (grad, x.detach(), *(w.detach() for w in weights), cu)))
        if hasattr(ops, "separable_conv1d_mul"):
            samples.append((ops.separable_conv1d_mul.default, (x, *weights, query.requires_grad_(), cu)))
    return samples


@pytest.mark.parametrize("namespace,device", NAMESPACE_DEVICES)
def test_opcheck_with_offsets(namespace, device, rng):
    opcheck(opcheck_samples(namespace, device, rng), namespace, device)


def test_compiled_with_offsets_matches_eager(rng):
    """torch.compile(fullgraph=True) of both convs on packed sequences: no graph break, the eager results."""
    lengths = [5, 0, 11, 2]
    values, logits = span_packed(lengths, 2, 16, 9, gen=rng)
    x, depthwise, pointwise, bias, query = separable_packed(lengths, 16, 32, 9, gen=rng)
    cu = offsets(lengths)

    def both(values, logits, x, query):
        conv = cf.ops.separable_conv1d(x, depthwise, pointwise, bias, multiplier=query, cu_seqlens=cu)
        return cf.ops.dynamic_span_conv(values, logits, 2, prefix=conv, cu_seqlens=cu)

    torch._dynamo.reset()
    compiled = torch.compile(both, fullgraph=True)
    torch.testing.assert_close(compiled(values, logits, x, query), both(values, logits, x, query))


# --- bad offsets -------------------------------------------------------------------------------------------------

# (offsets for a packed row of 18 tokens, the error, a fragment of its message)
BAD_OFFSETS = [
    ([0, 5, 4, 18], ValueError, r"must not decrease \(a negative length\): cu_seqlens\[2\] = 4 < cu_seqlens\[1\] = 5"),
    ([1, 18], ValueError, "must start at 0, got 1"),
    ([0, 10], ValueError, "must end at the 18 tokens of the input, got 10"),
    ([0, 5, 19], ValueError, "must end at the 18 tokens of the input, got 19"),
    ([18], ValueError, r"must be 1-D offsets \[N \+ 1\] with N >= 1"),
    ([[0, 18]], ValueError, r"must be 1-D offsets"),
    ([0.0, 18.0], TypeError, "must be int32 or int64 offsets"),
]


@pytest.mark.parametrize("bad,error,fragment", BAD_OFFSETS, ids=[str(b[0]) for b in BAD_OFFSETS])
def test_bad_offsets_are_refused_by_every_backend(backend_device, bad, error, fragment, rng):
    _, device = backend_device
    values, logits = on(device, span_packed([18], 2, 4, 3, gen=rng))
    x, depthwise, pointwise, bias, _ = on(device, separable_packed([18], 8, 4, 3, gen=rng))
    cu = torch.tensor(bad, device=device)
    with pytest.raises(error, match=rf"dynamic_span_conv: `cu_seqlens`.*{fragment}"):
        cf.ops.dynamic_span_conv(values, logits, 2, cu_seqlens=cu)
    with pytest.raises(error, match=rf"separable_conv1d: `cu_seqlens`.*{fragment}"):
        cf.ops.separable_conv1d(x, depthwise, pointwise, bias, cu_seqlens=cu)


def test_offsets_need_one_packed_row_on_the_input_device(backend_device, rng):
    _, device = backend_device
    values, logits = on(device, span_packed([3, 3], 2, 4, 3, gen=rng))
    with pytest.raises(ValueError, match=r"one packed row \[1, T, \.\.\.\], got \[2, 3, 8\]"):
        cf.ops.dynamic_span_conv(values.view(2, 3, 8), logits.view(2, 3, 6), 2, cu_seqlens=offsets([3, 3], device))
    with pytest.raises(ValueError, match="`cu_seqlens` is on meta"):
        cf.ops.dynamic_span_conv(values, logits, 2, cu_seqlens=offsets([3, 3], "meta"))


def test_offsets_changed_in_place_are_checked_again(rng):
    """The wrappers remember offsets they checked (one device sync per forward, not per op): a write to them is
    seen through the version counter."""
    values, logits = span_packed([3, 3], 2, 4, 3, gen=rng)
    cu = offsets([3, 3])
    cf.ops.dynamic_span_conv(values, logits, 2, cu_seqlens=cu)
    cu[1] = 7
    with pytest.raises(ValueError, match=r"cu_seqlens\[2\] = 6 < cu_seqlens\[1\] = 7"):
        cf.ops.dynamic_span_conv(values, logits, 2, cu_seqlens=cu)


# The C++ CPU ops called directly check the offsets' values themselves (CUDA's would need a device sync: there the
# Python wrappers check them, and the kernels clamp every row they read to the input).
@pytest.mark.parametrize("bad,error,fragment", BAD_OFFSETS[:4], ids=[str(b[0]) for b in BAD_OFFSETS[:4]])
def test_bad_offsets_are_refused_by_the_cpu_ops_called_directly(bad, error, fragment, rng):
    ops = torch.ops.convbert_fast
    values, logits = span_packed([18], 2, 4, 3, gen=rng)
    x, depthwise, pointwise, bias, query = separable_packed([18], 8, 4, 3, gen=rng)
    cu = torch.tensor(bad, dtype=torch.int32)
    for call in (
        lambda: ops.dynamic_span_conv(values, logits, 2, cu),
        lambda: ops.dynamic_span_conv_backward(values, values, logits, 2, cu),
        lambda: ops.dynamic_span_conv_concat(values, values, logits, 2, cu),
        lambda: ops.separable_conv1d(x, depthwise, pointwise, bias, cu),
        lambda: ops.separable_conv1d_backward(query, x, depthwise, pointwise, bias, cu),
    ):
        with pytest.raises(error, match=fragment):
            call()
    with pytest.raises(TypeError, match="cu_seqlens must be int32, got Long"):
        ops.dynamic_span_conv(values, logits, 2, cu.long())


# The Triton ops called directly take offsets unchecked (on a GPU their values never reach the host): the kernels
# clamp each row's window to [0, T], so offsets past either end read nothing outside the input and give what the
# clamped offsets give.
@TRITON_ON_CPU
@pytest.mark.parametrize("bad,clamped", [([-4, 5, 40], [0, 5, 12]), ([0, 5, 12, 30], [0, 5, 12, 12])])
def test_triton_kernels_clamp_offsets_past_the_input(bad, clamped, rng):
    ops = torch.ops.convbert_fast_triton
    values, logits = span_packed([5, 7], 2, 4, 5, gen=rng)
    x, depthwise, pointwise, bias, query = separable_packed([5, 7], 8, 4, 5, gen=rng)
    calls = [
        lambda cu: ops.dynamic_span_conv(values, logits, 2, cu),
        lambda cu: ops.dynamic_span_conv_backward(values, values, logits, 2, cu),
        lambda cu: ops.separable_conv1d_mul(x, depthwise, pointwise, bias, query, cu),
        lambda cu: ops.separable_conv1d_backward(query, x, depthwise, pointwise, bias, cu),
    ]
    for call in calls:
        torch.testing.assert_close(
            call(torch.tensor(bad, dtype=torch.int32)), call(torch.tensor(clamped, dtype=torch.int32))
        )


# The CUDA ops do not read the offsets' values (that would sync the device; the Python wrappers check them): called
# directly with offsets that break every rule, every kernel, tiled (K = 9) and general (K = 5, and all of them under
# CONVBERT_FAST_CUDA_KERNELS=v1 in the GPU pass), clamps what it finds to the row. compute-sanitizer's memcheck runs
# this in the GPU pass (tools/gpu_check.sh sanitize); here the outputs are only checked to be written and finite.
@NO_GPU
@pytest.mark.parametrize("kernel_size", [9, 5])
def test_cuda_ops_called_directly_with_bad_offsets_stay_inside_their_tensors(kernel_size, rng):
    ops = torch.ops.convbert_fast
    values, logits = on("cuda", span_packed([40], 2, 64, kernel_size, gen=rng))
    x, depthwise, pointwise, bias, query = on("cuda", separable_packed([40], 128, 8, kernel_size, gen=rng))
    for bad in ([0, 5, 4, 40], [1, 40], [0, 10], [0, 5, 41], [-7, 90, 3, 40], [0, 2**31 - 1], [40, 0, 0]):
        cu = torch.tensor(bad, dtype=torch.int32, device="cuda")
        outputs = [
            ops.dynamic_span_conv(values, logits, 2, cu),
            *ops.dynamic_span_conv_backward(values, values, logits, 2, cu),
            ops.separable_conv1d(x, depthwise, pointwise, bias, cu),
            *ops.separable_conv1d_backward(query, x, depthwise, pointwise, bias, cu),
        ]
        torch.cuda.synchronize()
        for out in outputs:
            assert torch.isfinite(out).all(), bad
