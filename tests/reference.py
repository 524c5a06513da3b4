"""Independent reference math for ConvBERT's pieces, written from the paper's definitions with explicit loops
over the kernel offsets and groups (no unfold, no conv1d, no permutes), and a tolerance rule for low precision."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def separable_conv1d_ref(x, depthwise_weight, pointwise_weight, bias):
    """x [B, L, C] -> [B, L, A]: y[t, c] = sum_j w[c, j] x[t + j - K//2, c] (zero outside), then pointwise + bias."""
    seq_len, kernel_size = x.shape[1], depthwise_weight.shape[-1]
    padded = F.pad(x, (0, 0, kernel_size // 2, kernel_size // 2))  # zero rows before and after
    depth = sum(padded[:, j : j + seq_len, :] * depthwise_weight[:, 0, j] for j in range(kernel_size))
    return depth @ pointwise_weight[:, :, 0].T + bias.reshape(-1)


def dynamic_span_conv_ref(values, kernel_logits, num_heads):
    """out[t, h] = sum_j softmax_j(logits[t, h, :]) * values[t + j - (K-1)/2, h] (zero outside [0, L))."""
    batch, seq_len, all_head_size = values.shape
    kernel_size = kernel_logits.shape[-1] // num_heads
    weights = kernel_logits.reshape(batch, seq_len, num_heads, kernel_size).softmax(-1)
    half = (kernel_size - 1) // 2
    padded = F.pad(values, (0, 0, half, half)).reshape(batch, seq_len + 2 * half, num_heads, -1)
    out = sum(weights[..., j, None] * padded[:, j : j + seq_len] for j in range(kernel_size))
    return out.reshape(batch, seq_len, all_head_size)


def grouped_linear_ref(x, weight, bias):
    """Group g maps features [g*Din/G, (g+1)*Din/G) with weight[g]; the outputs are concatenated."""
    num_groups, group_in, _ = weight.shape
    parts = [x[..., g * group_in : (g + 1) * group_in] @ weight[g] for g in range(num_groups)]
    return torch.cat(parts, dim=-1) + bias


def self_attention_ref(module, x, additive_mask=None, head_mask=None, encoder_states=None):
    """ConvBERT self-attention from its definition, reading the weights of a ConvBertSelfAttention `module`.
    With `encoder_states` [B, Lk, C], keys and values come from them (cross-attention); the conv half reads `x`.

    Returns (context [B, L, 2A] with the attention heads first, attention probabilities [B, H, L, Lk])."""
    batch, seq_len, _ = x.shape
    kv = x if encoder_states is None else encoder_states
    heads, head_size = module.num_attention_heads, module.attention_head_size

    def linear(layer, inp):
        return inp @ layer.weight.T + layer.bias

    query = linear(module.query, x)
    conv = module.key_conv_attn_layer
    key_conv = separable_conv1d_ref(x, conv.depthwise.weight, conv.pointwise.weight, conv.bias)
    kernel_logits = linear(module.conv_kernel_layer, key_conv * query)
    conv_context = dynamic_span_conv_ref(linear(module.conv_out_layer, x), kernel_logits, heads)

    q = query.reshape(batch, seq_len, heads, head_size)
    k = linear(module.key, kv).reshape(batch, kv.shape[1], heads, head_size)
    v = linear(module.value, kv).reshape(batch, kv.shape[1], heads, head_size)
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(head_size)
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = scores.softmax(-1)
    if head_mask is not None:
        probs = probs * head_mask.reshape(1, heads, 1, 1)
    attn_context = torch.einsum("bhlm,bmhd->blhd", probs, v).reshape(batch, seq_len, heads * head_size)
    return torch.cat([attn_context, conv_context], dim=-1), probs


def layer_norm_ref(h, weight, bias, eps):
    """LayerNorm over the last dimension from its definition: (h - mean) / sqrt(biased variance + eps)."""
    mean = h.sum(-1, keepdim=True) / h.shape[-1]
    variance = ((h - mean) ** 2).sum(-1, keepdim=True) / h.shape[-1]
    return (h - mean) / torch.sqrt(variance + eps) * weight + bias


def assert_within_torch_error(actual, torch_result, oracle, factor=2.0):
    """Low-precision rule (as flash-attention's tests): our error against an fp64 oracle may be at most `factor`
    times PyTorch's own error in the same dtype, plus one unit of rounding at the output's magnitude."""
    oracle = oracle.double()
    torch_error = (torch_result.double() - oracle).abs().max().item()
    our_error = (actual.double() - oracle).abs().max().item()
    rounding = torch.finfo(actual.dtype).eps * oracle.abs().max().item()
    assert our_error <= factor * torch_error + rounding, (
        f"{actual.dtype}: error {our_error:.3e} against the fp64 oracle exceeds {factor} x PyTorch's own "
        f"{torch_error:.3e} + {rounding:.3e}"
    )


def assert_gradients_match(op, ref, inputs, gen):
    """Gradients of every input of `op` against autograd through `ref`, fp64."""
    inputs = [t.requires_grad_() for t in inputs]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, ref_out = op(*inputs), ref(*ref_inputs)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=gen).to(out.device)
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref_out, ref_inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def assert_gradients_for_only_some_inputs(op, ref, inputs):
    """With one input requiring a gradient at a time: its gradient as `ref`'s, none for the others."""
    for wanted in range(len(inputs)):
        leaves = [t.detach().clone().requires_grad_(i == wanted) for i, t in enumerate(inputs)]
        ref_leaves = [t.detach().clone().requires_grad_(i == wanted) for i, t in enumerate(inputs)]
        op(*leaves).sum().backward()
        ref(*ref_leaves).sum().backward()
        for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
            if i == wanted:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)
            else:
                assert a.grad is None


def assert_backward_bitwise_repeatable(op, inputs):
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        op(*leaves).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def assert_within_dtype_bound(actual, oracle, magnitude, factor=2.0):
    """Low precision against an fp32 oracle computed from the same inputs, elementwise:
    |ours - oracle| <= factor * eps(dtype) * magnitude, where `magnitude` is the op applied to the inputs' absolute
    values (the sum of the absolute terms, which bounds a sum's rounding error). The inputs are exact in the dtype
    and the kernels accumulate in fp32, so every backend rounds at most a few times, each time by at most eps / 2
    of a value no larger than `magnitude`: factor 2 allows four such roundings. A window shifted by one token or an
    output off by 10% breaks the bound (tests/test_*.py prove it on deliberately broken copies)."""
    eps = torch.finfo(actual.dtype).eps
    error = (actual.float() - oracle.float()).abs()
    bound = factor * eps * magnitude.float()
    excess = (error - bound).max().item() if error.numel() else 0.0
    assert excess <= 0.0, (
        f"{actual.dtype}: an error of {error.max().item():.3e} against the fp32 oracle exceeds its bound "
        f"{factor} x eps x magnitude by {excess:.3e}"
    )


def dropout_keep_mask_ref(shape, p, seed):
    """The keep mask of dropout_add_layer_norm from its definition (csrc/dropout_mask.h), written independently:
    element i of the flattened [rows, C] input is kept when the top 24 bits of splitmix64(seed + (i + 1) * golden)
    are at least round(p * 2^24)."""
    import numpy as np

    threshold = min(int(p * 2**24 + 0.5), 2**24)
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + (np.arange(math.prod(shape), dtype=np.uint64) + np.uint64(1)) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(40)).astype(np.int64) >= threshold).reshape(shape)


# Deliberately broken copies of an op, for the tests that prove a test can fail (tests/test_<op>.py)
def scaled_copy(op, factor=1.1):
    """`op` with its output off by `factor` (then rounded to the output's dtype again)."""
    return lambda *args, **kwargs: op(*args, **kwargs) * factor


def shifted_window_copy(op):
    """`op` reading every token's window one token to the right: the first argument ([B, L, ...]) moved up by one
    token, zero after the last, as an off-by-one in a kernel's window offset would."""

    def broken(first, *args, **kwargs):
        return op(torch.cat([first[:, 1:], torch.zeros_like(first[:, :1])], dim=1), *args, **kwargs)

    return broken
