"""dropout_add_layer_norm, the C++ extension's fused end of each sublayer (CPU and CUDA; no Triton kernel):
values against the definition, the dropout mask's distribution and reproducibility, gradients, opcheck, checks."""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    assert_within_dtype_bound,
    assert_within_torch_error,
    dropout_keep_mask_ref,
    layer_norm_ref,
    scaled_copy,
)
from samples import (
    DTYPES,
    LOW_PRECISION,
    NORM_CASES,
    assert_every_tensor_argument_checked,
    assert_refuses,
    dropout_add_layer_norm_samples,
    norm_inputs,
    requiring_grad,
)

import convbert_fast as cf


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
@pytest.mark.parametrize("rows,channels", NORM_CASES)
def test_dropout_add_layer_norm_without_dropout_matches_reference(device_name, dtype, rows, channels, rng):
    x, residual, weight, bias = norm_inputs(rows, channels, dtype, device_name, rng)
    out = cf.ops.dropout_add_layer_norm(x, residual, weight, bias, p=0.1, eps=1e-5, training=False)
    assert out.shape == x.shape and out.dtype == dtype
    if out.numel():
        oracle = layer_norm_ref(*(t.double() for t in (x + residual, weight, bias)), 1e-5)
        torch_result = torch.nn.functional.layer_norm(x + residual, (channels,), weight, bias, 1e-5)
        assert_within_torch_error(out, torch_result, oracle)
        if cf.ops.cpp.LOADED:  # the op itself (CPU inference in fp32/fp64 runs torch's ops instead: below)
            seed = torch.zeros((), dtype=torch.int64)
            direct = torch.ops.convbert_fast.dropout_add_layer_norm(x, residual, weight, bias, 0.0, 1e-5, seed)[0]
            assert_within_torch_error(direct, torch_result, oracle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_add_layer_norm_cpu_inference_is_torchs_add_and_layer_norm(dtype, rng):
    """Without dropout or a gradient on the CPU, the cpp backend runs torch's add + layer_norm (faster there than
    the op's pass), so transformers' numbers bit for bit; with a gradient to take, the op and its backward."""
    x, residual, weight, bias = norm_inputs((128,), 768, dtype, "cpu", rng)
    torch_result = torch.nn.functional.layer_norm(x + residual, (768,), weight, bias, 1e-12)
    seed = torch.zeros((), dtype=torch.int64)
    with cf.use_backend("cpp"):
        for training in (False, True):  # eval, and training without dropout
            out = cf.ops.dropout_add_layer_norm(x, residual, weight, bias, p=0.0 if training else 0.1, eps=1e-12,
                                                training=training)  # fmt: skip
            assert torch.equal(out, torch_result)
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
        out = cf.ops.dropout_add_layer_norm(*leaves, p=0.1, eps=1e-12, training=False)
        op_out = torch.ops.convbert_fast.dropout_add_layer_norm(x, residual, weight, bias, 0.0, 1e-12, seed)[0]
        assert torch.equal(out.detach(), op_out)  # the op, whose backward runs
        assert not torch.equal(op_out, torch_result)  # (so the first assertions could fail: the results differ)
        grads = torch.autograd.grad(out.sum(), leaves)
        reference = torch.nn.functional.layer_norm(leaves[0] + leaves[1], (768,), *leaves[2:], 1e-12)
        expected = torch.autograd.grad(reference.sum(), leaves)
        for ours, theirs in zip(grads, expected):
            torch.testing.assert_close(ours, theirs)


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
    inputs = requiring_grad(norm_inputs((2, 3), 5, torch.float64, device_name, rng), device_name)
    seed = torch.tensor(99)
    op = torch.ops.convbert_fast.dropout_add_layer_norm
    assert torch.autograd.gradcheck(lambda *a: op(*a, p, 1e-5, seed)[0], inputs)


def test_dropout_add_layer_norm_gradients_match_reference_under_the_same_mask(device_name, rng):
    inputs = requiring_grad(norm_inputs((3, 4), 48, torch.float64, device_name, rng), device_name)
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
    samples = dropout_add_layer_norm_samples(device_name, gen=rng, cases=[((2, 7), 96), ((3,), 16)])
    for (_, (x, residual, weight, bias)), p in zip(samples, [0.1, 0.0]):
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


def test_dropout_add_layer_norm_mask_is_the_documented_hash(device_name):
    """The op's mask, read back, against an independent implementation of its definition (reference.py): the
    same bits on every device."""
    for shape, p, seed in [((8, 3, 100), 0.1, 2024), ((5, 257), 0.5, -7), ((4, 64), 0.9, 2**40 + 3)]:
        keep = kept_mask(shape, p, torch.tensor(seed), device_name).cpu()
        assert torch.equal(keep, dropout_keep_mask_ref(shape, p, seed))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_add_layer_norm_mask_rows_are_independent(device_name, p):
    """A mask repeated on every row (or shifted by a column from row to row) has the right mean but is not dropout:
    independent rows agree on a fraction p^2 + (1 - p)^2 of their columns, within 5 standard deviations over 523776
    pairs, also with one of them shifted by a column; and no two rows are alike."""
    keep = kept_mask((512, 1024), p, torch.tensor(77), device_name).cpu()
    agree = p**2 + (1 - p) ** 2
    for a, b in [(keep[:-1], keep[1:]), (keep[:-1, 1:], keep[1:, :-1]), (keep[:-1, :-1], keep[1:, 1:])]:
        observed = (a == b).double().mean().item()
        assert abs(observed - agree) < 5 * math.sqrt(agree * (1 - agree) / a.numel()), observed
    assert len({tuple(row) for row in keep.tolist()}) == keep.shape[0]


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_dropout_add_layer_norm_nan_and_inf_in_a_dropped_element_spread_as_in_eager(device_name, special, rng):
    """Eager dropout multiplies by its mask, so a NaN or inf that it drops still gives NaN (inf * 0), which
    LayerNorm spreads over the row, forward and backward; the C++ kernels multiply too, on every device."""
    x, residual, weight, bias = (t.requires_grad_() for t in norm_inputs((4,), 64, torch.float32, device_name, rng))
    p, seed = 0.5, 31
    keep = dropout_keep_mask_ref(x.shape, p, seed).to(device_name)
    row, col = (~keep).nonzero()[0].tolist()
    with torch.no_grad():
        x[row, col] = special
    ours = torch.ops.convbert_fast.dropout_add_layer_norm(x, residual, weight, bias, p, 1e-5, torch.tensor(seed))[0]
    eager = torch.nn.functional.layer_norm(x * keep / (1 - p) + residual, (64,), weight, bias, 1e-5)
    assert ours[row].isnan().all() and ours[torch.arange(4) != row].isfinite().all()
    grad = torch.randn(x.shape, generator=rng).to(device_name)
    for a, b in zip(torch.autograd.grad(ours, (x, residual), grad), torch.autograd.grad(eager, (x, residual), grad)):
        assert torch.equal(a.isnan(), b.isnan())


# --- low precision against an fp32 oracle, and the proof that this test catches broken kernels -------------------


def check_dropout_add_layer_norm_low_precision(op, dtype, device, gen):
    """`op` (without dropout) on bf16/fp16 inputs against the definition in fp32 on the same inputs, within the
    dtype's bound; the magnitude covers a rounding of x + residual (as eager makes) besides the output's."""
    x, residual, weight, bias = norm_inputs((4, 16), 256, dtype, device, gen)
    out = op(x, residual, weight, bias)
    h = x.float() + residual.float()
    oracle = layer_norm_ref(h, weight.float(), bias.float(), 1e-5)
    rstd = 1 / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    xhat = (h - h.mean(-1, keepdim=True)) * rstd
    magnitude = (xhat.abs() + h.abs() * rstd) * weight.float().abs() + bias.float().abs()
    assert_within_dtype_bound(out, oracle, magnitude)


def _without_dropout(x, residual, weight, bias):
    return cf.ops.dropout_add_layer_norm(x, residual, weight, bias, p=0.1, eps=1e-5, training=False)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_dropout_add_layer_norm_low_precision_within_the_dtype_bound(backend_device, dtype, rng):
    check_dropout_add_layer_norm_low_precision(_without_dropout, dtype, backend_device[1], rng)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_dropout_add_layer_norm_low_precision_test_fails_on_a_broken_copy(device_name, dtype, rng):
    with pytest.raises(AssertionError, match="exceeds its bound"):
        check_dropout_add_layer_norm_low_precision(scaled_copy(_without_dropout), dtype, device_name, rng)


# --- the C++ ops called directly: every tensor argument checked at the boundary ----------------------------------


def _norm_direct_calls(device, gen):
    ops = torch.ops.convbert_fast
    x, residual, weight, bias = norm_inputs((2, 3), 8, torch.float32, device, gen)
    seed = torch.tensor(3)
    _, mean, rstd = ops.dropout_add_layer_norm(x, residual, weight, bias, 0.1, 1e-5, seed)
    grad = torch.randn(x.shape, generator=gen).to(device)
    return {
        "forward": (ops.dropout_add_layer_norm.default, (x, residual, weight, bias, 0.1, 1e-5, seed)),
        "backward": (ops.dropout_add_layer_norm_backward.default, (grad, x, residual, weight, mean, rstd, 0.1, seed)),
    }


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_dropout_add_layer_norm_direct_calls_check_every_tensor(device_name, which, rng):
    assert_every_tensor_argument_checked(*_norm_direct_calls(device_name, rng)[which], device_name)


# (which call, argument index, the bad argument from the good one, error, message)
NORM_BAD_ARGUMENTS = [
    ("forward", 1, lambda t: t[..., :7], ValueError, r"residual must be \[2, 3, 8\]"),
    ("forward", 2, lambda t: t[:7], ValueError, r"weight must be \[8\]"),
    ("forward", 3, lambda t: t[None], ValueError, r"bias must be \[8\]"),
    ("forward", 4, lambda p: 1.5, ValueError, r"p must be in \[0, 1\]"),
    ("forward", 5, lambda eps: -1.0, ValueError, "eps must be >= 0"),
    ("forward", 6, lambda s: s.double(), ValueError, "seed must be one int64 on the CPU"),
    ("forward", 6, lambda s: torch.tensor([1, 2]), ValueError, "seed must be one int64 on the CPU"),
    ("backward", 0, lambda t: t[..., :7], ValueError, r"grad_out must be \[2, 3, 8\]"),
    ("backward", 4, lambda t: t[:5], ValueError, r"mean must be \[6\]"),
    ("backward", 5, lambda t: t.double(), TypeError, "rstd must be Float"),
    ("backward", 6, lambda p: -0.5, ValueError, r"p must be in \[0, 1\]"),
]


@pytest.mark.parametrize("which,index,make_bad,error,fragment", NORM_BAD_ARGUMENTS)
def test_dropout_add_layer_norm_direct_calls_refuse_bad_arguments(device_name, which, index, make_bad, error,
                                                                  fragment, rng):
    assert_refuses(_norm_direct_calls(device_name, rng)[which], index, make_bad, error, fragment)


# dropout alone (ops.dropout): the same mask, for the attention probabilities and the embeddings of the fused layers


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_is_the_documented_mask_scaled_in_the_accumulation_dtype(device_name, dtype, rng):
    """out = x * (keep ? 1 / (1 - p) : 0), the product in fp32 (fp64 for fp64) rounded once, keep the documented hash
    of the flat index (reference.py): the same bits on every device; a non-contiguous x is masked in its contiguous
    order; the dropped fraction is p within 5 standard deviations; another seed, another mask."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for shape, p, seed in [((8, 3, 100), 0.1, 2024), ((5, 257), 0.5, -7), ((64, 4096), 0.3, 2**40 + 3)]:
        x = torch.randn(shape, generator=rng).to(device_name, dtype)
        out = torch.ops.convbert_fast.dropout(x, p, torch.tensor(seed))
        keep = dropout_keep_mask_ref(shape, p, seed).to(device_name)
        scale = torch.tensor(1.0 / (1.0 - p), dtype=acc)
        assert torch.equal(out, (x.to(acc) * torch.where(keep, scale.to(device_name), 0)).to(dtype))
        assert abs((~keep).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    seed = torch.tensor(3)
    x = torch.randn(6, 40, generator=rng).to(device_name, dtype)
    op = torch.ops.convbert_fast.dropout
    assert torch.equal(op(x.t(), 0.2, seed), op(x.t().contiguous(), 0.2, seed))
    assert not torch.equal(op(x, 0.2, seed), op(x, 0.2, torch.tensor(4)))


def test_dropout_gradcheck_and_its_gradient_is_the_same_mask(device_name, rng):
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=rng).to(device_name).requires_grad_()
    seed, p = torch.tensor(99), 0.3
    assert torch.autograd.gradcheck(lambda t: torch.ops.convbert_fast.dropout(t, p, seed), (x,))
    grad = torch.randn(x.shape, dtype=torch.float64, generator=rng).to(device_name)
    (ours,) = torch.autograd.grad(torch.ops.convbert_fast.dropout(x, p, seed), x, grad)
    keep = dropout_keep_mask_ref(x.shape, p, 99).to(device_name)
    torch.testing.assert_close(ours, torch.where(keep, grad / (1 - p), 0), rtol=1e-15, atol=0)


def test_dropout_opcheck(device_name, rng):
    for shape, p in [((2, 7, 96), 0.1), ((3,), 0.0), ((0, 4), 0.5)]:
        x = torch.randn(shape, generator=rng).to(device_name).requires_grad_()
        torch.library.opcheck(torch.ops.convbert_fast.dropout.default, (x, p, torch.tensor(11)))


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_dropout_of_everything_is_torchs_including_nan_and_inf(device_name, special, rng):
    """p = 1 drops every element: x * 0, as F.dropout gives (NaN and inf times zero are NaN, not 0)."""
    x = torch.randn(4, 9, generator=rng).to(device_name)
    x[1, 2] = special
    out = torch.ops.convbert_fast.dropout(x, 1.0, torch.tensor(1))
    torch.testing.assert_close(out, torch.nn.functional.dropout(x, 1.0, True), equal_nan=True, rtol=0, atol=0)
    assert out[1, 2].isnan() and (out.isnan().sum() == 1)


def test_dropout_wrapper_draws_its_seed_from_torch_and_is_torchs_under_eager(device_name, rng):
    """cf.ops.dropout: x itself in eval mode or at p = 0; reproducible from torch.manual_seed; under the eager
    backend F.dropout (transformers' mask, bit for bit, for the same seed)."""
    x = torch.randn(16, 33, generator=rng).to(device_name)
    assert cf.ops.dropout(x, 0.4, training=False) is x and cf.ops.dropout(x, 0.0, training=True) is x
    torch.manual_seed(7)
    first = cf.ops.dropout(x, 0.4, training=True)
    torch.manual_seed(7)
    assert torch.equal(cf.ops.dropout(x, 0.4, training=True), first)
    assert not torch.equal(cf.ops.dropout(x, 0.4, training=True), first)
    with cf.use_backend("eager"):
        torch.manual_seed(7)
        eager = cf.ops.dropout(x, 0.4, training=True)
    torch.manual_seed(7)
    assert torch.equal(eager, torch.nn.functional.dropout(x, 0.4, True)) and not torch.equal(eager, first)


def test_dropout_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"dropout: probability `p` must be in \[0, 1\], got 1.5"):
        cf.ops.dropout(torch.zeros(3), 1.5, training=True)
    with pytest.raises(TypeError, match="dropout"):
        cf.ops.dropout(torch.zeros(3, dtype=torch.int64), 0.1, training=True)
    op = torch.ops.convbert_fast.dropout
    with pytest.raises(ValueError, match=r"dropout: p must be in \[0, 1\], got -0.5"):
        op(torch.zeros(3), -0.5, torch.tensor(1))
    for bad_seed in (torch.tensor(1.0), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="dropout: seed must be one int64"):
            op(torch.zeros(3), 0.1, bad_seed)
    with pytest.raises(TypeError, match="dropout"):
        op(torch.zeros(3, dtype=torch.int32), 0.1, torch.tensor(1))
