"""Inputs of the four ops, built once: per op its shape cases, an input builder, and `<op>_samples(device, dtype)`,
the inputs of every case, shared by the value, gradient, opcheck (every backend namespace) and robustness tests."""

from __future__ import annotations

import pytest
import torch

# Parameters named float32, bfloat16, float16 (not dtype0, dtype1, ...), so that `-k float32` picks a dtype, as
# tools/gpu_check.sh does
def _dtype_params(*dtypes):
    return [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in dtypes]


DTYPES = _dtype_params(torch.float32, torch.bfloat16, torch.float16)


def randn(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


def on(device, tensors):
    return [t.to(device) for t in tensors]


def double(tensors):
    return [t.double() for t in tensors]


def strided(t):
    """The same values with a stride of 2 in the last dimension."""
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


def requiring_grad(tensors, device="cpu"):
    return tuple(t.double().to(device).requires_grad_() for t in tensors)


def gradcheck(backend_device, fn, inputs):
    """fp64 gradcheck; in Triton's interpreter (slow per call) its fast mode, which checks the Jacobian along
    random directions instead of column by column."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=backend_device == ("triton", "cpu"))


# --- separable_conv1d ---------------------------------------------------------------------------------------------

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


def separable_inputs(batch, seq_len, channels, out_channels, kernel_size, dtype=torch.float32, gen=None):
    return (
        randn(batch, seq_len, channels, dtype=dtype, gen=gen),
        randn(channels, 1, kernel_size, dtype=dtype, scale=0.3, gen=gen),
        randn(out_channels, channels, 1, dtype=dtype, scale=0.3, gen=gen),
        randn(out_channels, 1, dtype=dtype, gen=gen),
    )


def separable_conv1d_samples(device, dtype=torch.float32, gen=None, cases=SEPARABLE_CASES):
    """(case, [x, depthwise_weight, pointwise_weight, bias]) per case."""
    return [(case, on(device, separable_inputs(*case, dtype, gen))) for case in cases]


# --- dynamic_span_conv --------------------------------------------------------------------------------------------

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


def span_inputs(batch, seq_len, heads, head_size, kernel_size, dtype=torch.float32, gen=None):
    return (
        randn(batch, seq_len, heads * head_size, dtype=dtype, gen=gen),
        randn(batch, seq_len, heads * kernel_size, dtype=dtype, scale=2.0, gen=gen),
    )


def dynamic_span_conv_samples(device, dtype=torch.float32, gen=None, cases=SPAN_CASES):
    """(case, [values, kernel_logits]) per case; num_heads is case[2]."""
    return [(case, on(device, span_inputs(*case, dtype, gen))) for case in cases]


# --- grouped_linear -----------------------------------------------------------------------------------------------

# (leading shape, groups, group_in, group_out)
GROUPED_CASES = [((2, 16), 2, 16, 32), ((7,), 4, 3, 5), ((2, 3, 4), 1, 8, 8), ((0, 5), 2, 4, 4), ((3, 17), 2, 48, 192)]


def grouped_inputs(leading, groups, group_in, group_out, dtype=torch.float32, gen=None):
    return (
        randn(*leading, groups * group_in, dtype=dtype, gen=gen),
        randn(groups, group_in, group_out, dtype=dtype, scale=0.3, gen=gen),
        randn(groups * group_out, dtype=dtype, gen=gen),
    )


def grouped_linear_samples(device, dtype=torch.float32, gen=None, cases=GROUPED_CASES):
    """(case, [x, weight, bias]) per case."""
    return [(case, on(device, grouped_inputs(*case, dtype, gen))) for case in cases]


# --- dropout_add_layer_norm ---------------------------------------------------------------------------------------

# (leading shape, channels)
NORM_CASES = [((2, 7), 96), ((1, 1), 1), ((3,), 768), ((0, 4), 16), ((2, 5), 1000)]


def norm_inputs(rows, channels, dtype, device, gen):
    x, residual = randn(*rows, channels, gen=gen), randn(*rows, channels, gen=gen)
    weight, bias = 1 + 0.1 * randn(channels, gen=gen), 0.1 * randn(channels, gen=gen)
    return [t.to(device, dtype) for t in (x, residual, weight, bias)]


def dropout_add_layer_norm_samples(device, dtype=torch.float32, gen=None, cases=NORM_CASES):
    """(case, [x, residual, weight, bias]) per case."""
    return [(case, norm_inputs(*case, dtype, device, gen)) for case in cases]


LOW_PRECISION = _dtype_params(torch.bfloat16, torch.float16)


def assert_every_tensor_argument_checked(op, args, device):
    """A torch.ops.convbert_fast op called directly (no Python wrapper in front, as opcheck and users call it):
    each tensor argument in turn in another dtype (TypeError) and, in a CUDA call, on the CPU (ValueError, where a
    kernel would otherwise read a host pointer); each refused with a message naming the argument. The good call
    runs afterwards: the process, and on CUDA its context, survived. The dropout seed is checked on its own."""
    import re

    names = [a.name for a in op._schema.arguments]
    for i, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor) or names[i] == "seed":
            continue
        cases = [(arg.to(torch.float64 if arg.dtype != torch.float64 else torch.float32), TypeError)]
        if device == "cuda":
            cases.append((arg.cpu(), ValueError))
        for bad, error in cases:
            broken = list(args)
            broken[i] = bad
            with pytest.raises(error, match=rf"\b{re.escape(names[i])}\b"):
                op(*broken)
    op(*args)
    if device == "cuda":
        torch.cuda.synchronize()


def assert_refuses(call, index, make_bad, error, fragment):
    """`call`, an (op, args) pair, with argument `index` replaced by make_bad(that argument): refused with `error`
    and a message matching `fragment`."""
    op, args = call
    args = list(args)
    args[index] = make_bad(args[index])
    with pytest.raises(error, match=fragment):
        op(*args)
