"""dropout_add_layer_norm, the C++ extension's fused end of each sublayer (CPU and CUDA; no Triton kernel):
values against the definition, the dropout mask's distribution and reproducibility, gradients, opcheck, checks."""

from __future__ import annotations

import math

import pytest
import torch
from reference import assert_within_torch_error, layer_norm_ref
from samples import DTYPES, NORM_CASES, dropout_add_layer_norm_samples, norm_inputs, requiring_grad

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
    inputs = requiring_grad(norm_inputs((2, 3), 5, torch.float64, device_name, rng))
    seed = torch.tensor(99)
    op = torch.ops.convbert_fast.dropout_add_layer_norm
    assert torch.autograd.gradcheck(lambda *a: op(*a, p, 1e-5, seed)[0], inputs)


def test_dropout_add_layer_norm_gradients_match_reference_under_the_same_mask(device_name, rng):
    inputs = requiring_grad(norm_inputs((3, 4), 48, torch.float64, device_name, rng))
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
