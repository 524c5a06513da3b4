"""ONNX of the fast model: torch.onnx.export(dynamo=True) with a custom_translation_table that writes each of our ops
in standard ONNX (opset 23; onnxscript), so that ONNX Runtime runs the graph with no library of ours.

The graph keeps the fused layers' structure: one GEMM for Q, K, V and conv_out (their weights folded into one
[C, 4A] initializer), ONNX's Attention for scaled_dot_product_attention, the grouped GEMM as one batched MatMul over
the groups followed by Gelu, the span conv after the attention half (a Concat), Add + LayerNormalization where our
kernel fuses dropout + residual + LayerNorm. The span conv is a sum of K shifted value rows weighted by the softmax
(no K-times larger `unfold` tensor; as fast in ONNX Runtime as the unfold + MatMul form, and lighter).

Only inference ops are translated: the backward ops and dynamic_span_conv_into (written in place, used by no
forward of the model) never appear in an exported inference graph. The unpadded (varlen) mode's `cu_seqlens` is
refused at export time.
"""

from __future__ import annotations

import torch
from onnxscript import opset23 as op

from . import program

OPSET = 23  # ONNX Attention (opset 23) for scaled_dot_product_attention; Gelu needs 20


def _ints(*values):
    return op.Constant(value_ints=list(values))


def _refuse_varlen(name, cu_seqlens):
    if cu_seqlens is not None:
        raise ValueError(
            f"{name}: the unpadded (varlen) mode (cu_seqlens) has no ONNX translation; export the model with "
            "padded batches and an attention mask"
        )


def span_conv(values, kernel_logits, num_heads, cu_seqlens=None):
    """values [B, L, H*D], kernel_logits [B, L, H*K] -> [B, L, H*D]: for each token the softmax-weighted sum of
    the K value rows centred on it (zero rows outside the sequence)."""
    _refuse_varlen("dynamic_span_conv", cu_seqlens)
    all_head_size = values.shape[-1]
    kernel_size = kernel_logits.shape[-1] // num_heads
    head_size, half = all_head_size // num_heads, (kernel_size - 1) // 2
    weights = op.Softmax(op.Reshape(kernel_logits, _ints(0, 0, num_heads, kernel_size)), axis=-1)  # [B, L, H, K]
    rows = op.Reshape(values, _ints(0, 0, num_heads, head_size))  # [B, L, H, D]
    rows = op.Pad(rows, _ints(0, half, 0, 0, 0, half, 0, 0))  # [B, L + K - 1, H, D]: the zero halo
    seq_len = op.Shape(values, start=1, end=2)
    terms = []
    for k in range(kernel_size):  # tap k reads row t + k - half: rows k .. k + L of the padded tensor
        shifted = op.Slice(rows, _ints(k), op.Add(seq_len, _ints(k)), _ints(1))
        weight = op.Slice(weights, _ints(k), _ints(k + 1), _ints(3))  # [B, L, H, 1]
        terms.append(op.Mul(shifted, weight))
    return op.Reshape(op.Sum(*terms), _ints(0, 0, all_head_size))


def span_conv_concat(prefix, values, kernel_logits, num_heads, cu_seqlens=None):
    """[prefix | span conv] along the channels: the attention half first."""
    conv = span_conv(values, kernel_logits, num_heads, cu_seqlens)
    return op.Concat(op.Reshape(prefix, _ints(0, 0, -1)), conv, axis=-1)


def separable_conv1d(x, depthwise_weight, pointwise_weight, bias, cu_seqlens=None):
    """x [B, L, C] -> [B, L, A]: depthwise Conv over the sequence (zero padding K // 2), then the pointwise map as
    a MatMul with [C, A] (folded from the [A, C, 1] weight) plus the bias."""
    _refuse_varlen("separable_conv1d", cu_seqlens)
    channels, kernel_size, out_channels = x.shape[-1], depthwise_weight.shape[-1], pointwise_weight.shape[0]
    pad = kernel_size // 2
    y = op.Conv(
        op.Transpose(x, perm=[0, 2, 1]), depthwise_weight, group=channels, kernel_shape=[kernel_size], pads=[pad, pad]
    )  # [B, C, L]
    pointwise = op.Transpose(op.Reshape(pointwise_weight, _ints(out_channels, channels)), perm=[1, 0])  # [C, A]
    return op.Add(op.MatMul(op.Transpose(y, perm=[0, 2, 1]), pointwise), op.Reshape(bias, _ints(out_channels)))


def separable_conv1d_mul(x, depthwise_weight, pointwise_weight, bias, multiplier, cu_seqlens=None):
    return op.Mul(separable_conv1d(x, depthwise_weight, pointwise_weight, bias, cu_seqlens), multiplier)


def grouped_linear(x, weight, bias):
    """x [..., G * Din/G], weight [G, Din/G, Dout/G] -> [..., G * Dout/G]: one batched MatMul over the groups."""
    groups, group_in, group_out = weight.shape
    y = op.Transpose(op.Reshape(x, _ints(-1, groups, group_in)), perm=[1, 0, 2])  # [G, N, Din/G]
    y = op.Transpose(op.MatMul(y, weight), perm=[1, 0, 2])  # [N, G, Dout/G]
    shape = op.Concat(op.Shape(x, end=-1), _ints(groups * group_out), axis=0)
    return op.Add(op.Reshape(y, shape), bias)


def grouped_linear_gelu(x, weight, bias):
    pre = grouped_linear(x, weight, bias)
    return op.Gelu(pre), pre


def dropout_add_layer_norm(x, residual, weight, bias, p, eps, seed):
    """LayerNorm(x + residual) and its per-row mean and 1/std: dropout is refused (an inference graph has none)."""
    if p != 0:
        raise ValueError(f"dropout_add_layer_norm: dropout p = {p} in the graph; export a model in eval mode")
    out, mean, rstd = op.LayerNormalization(op.Add(x, residual), weight, bias, axis=-1, epsilon=eps, stash_type=1)
    return out, op.Reshape(mean, _ints(-1)), op.Reshape(rstd, _ints(-1))


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """ONNX Attention, with an additive mask [B, 1, 1, Lk] expanded to [B, 1, Lq, Lk]: ONNX Runtime's kernel
    requires the query length in the mask (torch.onnx's own translation passes the mask as given and fails there)."""
    if dropout_p or is_causal or enable_gqa:
        raise ValueError("scaled_dot_product_attention: only inference without a causal mask or GQA is translated")
    if attn_mask is not None:
        lengths = (op.Shape(attn_mask, end=2), op.Shape(query, start=2, end=3), op.Shape(key, start=2, end=3))
        attn_mask = op.Expand(attn_mask, op.Concat(*lengths, axis=0))
    out, *_ = op.Attention(query, key, value, attn_mask, scale=scale)
    return out


TRANSLATIONS = {
    "dynamic_span_conv": span_conv,
    "dynamic_span_conv_concat": span_conv_concat,
    "separable_conv1d": separable_conv1d,
    "separable_conv1d_mul": separable_conv1d_mul,
    "grouped_linear": grouped_linear,
    "grouped_linear_gelu": grouped_linear_gelu,
    "dropout_add_layer_norm": dropout_add_layer_norm,
}


def translation_table() -> dict:
    """{op overload: its ONNX translation} for our ops of both namespaces (cpp and triton backends) where they are
    registered, and for aten's scaled_dot_product_attention."""
    table = {torch.ops.aten.scaled_dot_product_attention.default: scaled_dot_product_attention}
    for namespace in ("convbert_fast", "convbert_fast_triton"):
        ops = getattr(torch.ops, namespace)
        for name, translation in TRANSLATIONS.items():
            if hasattr(ops, name):
                table[getattr(ops, name).default] = translation
    return table


def export_onnx(model, path, sample=None, custom_ops: bool = True):
    """Writes `model` (eval mode) with the deployed signature as ONNX (opset 23) to `path` and returns the
    torch.onnx.ONNXProgram. Constants are folded whatever their size, so the weights that the fused projection
    concatenates at run time become one initializer. `custom_ops=False` exports without our table (for a model
    without our ops: transformers')."""
    import onnxscript

    program.check_exportable(model)
    sample = program.sample_inputs(model) if sample is None else sample
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            program.DeployedModel(model),
            tuple(sample),
            dynamo=True,
            custom_translation_table=translation_table() if custom_ops else None,
            dynamic_shapes=program.dynamic_shapes(model),
            opset_version=OPSET,
            input_names=list(program.INPUT_NAMES),
            output_names=list(program.output_names(model)),
            verbose=False,
        )
    limit = 2**40  # no size limit: a folded [C, 4A] weight is what ONNX Runtime would fold at every load anyway
    onnxscript.optimizer.optimize(onnx_program.model, input_size_limit=limit, output_size_limit=limit)
    onnx_program.save(str(path))
    return onnx_program
