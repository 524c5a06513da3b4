"""Each op, forward + backward, side by side: transformers' eager code against our backends.

    pytest benchmarks --benchmark-only --benchmark-group-by=group      (add --bench-device cuda on a GPU)

Shapes are the issue's: B=8, L=512 on the CPU (B=32 on a GPU), 6 conv heads of 64 (A=384, C=768), K=9;
grouped linear 384 -> 1536 in 2 groups (conv-bert-medium-small's FFN). CPU: fp32; GPU: bf16.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.convbert import modeling_convbert as hf

import convbert_fast as cf

PROVIDERS = ["transformers", "eager", "cpp"]


def shapes(device, tiny):
    if tiny:
        return dict(batch=2, seq_len=16, dtype=torch.float32)
    return dict(batch=32 if device.type == "cuda" else 8, seq_len=512,
                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_fwd_bwd(benchmark, device, fn, inputs):
    with torch.no_grad():
        out = fn(*inputs)
    grad = torch.randn_like(out)  # a dense upstream gradient, as in a model (not sum()'s expanded ones)

    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
        synchronize(device)

    step()  # warm-up (and a check that it runs)
    benchmark.pedantic(step, rounds=10 if device.type == "cpu" else 50, iterations=1, warmup_rounds=1)


def leaves(device, dtype, *shapes_, scale=1.0):
    return [(torch.randn(*s, device=device) * scale).to(dtype).requires_grad_() for s in shapes_]


def span_conv_transformers(values, logits, heads=6, kernel_size=9):
    """The span conv as transformers' ConvBertSelfAttention.forward computes it (unfold path), verbatim shapes."""
    batch, seq_len, all_head_size = values.shape
    head_size = all_head_size // heads
    conv_kernel_layer = torch.softmax(torch.reshape(logits, [-1, kernel_size, 1]), dim=1)
    conv_out_layer = values.transpose(1, 2).contiguous().unsqueeze(-1)
    conv_out_layer = torch.nn.functional.unfold(
        conv_out_layer, kernel_size=[kernel_size, 1], dilation=1, padding=[(kernel_size - 1) // 2, 0], stride=1
    )
    conv_out_layer = conv_out_layer.transpose(1, 2).reshape(batch, -1, all_head_size, kernel_size)
    conv_out_layer = torch.reshape(conv_out_layer, [-1, head_size, kernel_size])
    return torch.matmul(conv_out_layer, conv_kernel_layer).reshape(batch, seq_len, all_head_size)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_dynamic_span_conv(benchmark, provider, device, tiny):
    s = shapes(device, tiny)
    benchmark.group = "dynamic_span_conv fwd+bwd"
    inputs = leaves(device, s["dtype"], (s["batch"], s["seq_len"], 384), (s["batch"], s["seq_len"], 6 * 9))
    if provider == "transformers":
        fn = span_conv_transformers
    else:
        def fn(v, k):
            with cf.use_backend(provider):
                return cf.ops.dynamic_span_conv(v, k, 6)
    run_fwd_bwd(benchmark, device, fn, inputs)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_separable_conv1d(benchmark, provider, device, tiny):
    s = shapes(device, tiny)
    benchmark.group = "separable_conv1d fwd+bwd"
    config = cf.ConvBertConfig()
    module = hf.SeparableConv1D(config, 768, 384, 9).to(device, s["dtype"])
    (x,) = leaves(device, s["dtype"], (s["batch"], s["seq_len"], 768))
    if provider == "transformers":
        def fn(x):  # as ConvBertSelfAttention calls it: transpose in, transpose out
            return module(x.transpose(1, 2)).transpose(1, 2)
    else:
        def fn(x):
            with cf.use_backend(provider):
                return cf.ops.separable_conv1d(x, module.depthwise.weight, module.pointwise.weight, module.bias)
    run_fwd_bwd(benchmark, device, fn, [x])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_grouped_linear(benchmark, provider, device, tiny):
    s = shapes(device, tiny)
    benchmark.group = "grouped_linear 384->1536 G=2 fwd+bwd"
    module = hf.GroupedLinearLayer(384, 1536, 2).to(device, s["dtype"])
    torch.nn.init.normal_(module.weight, std=0.02)
    torch.nn.init.zeros_(module.bias)
    (x,) = leaves(device, s["dtype"], (s["batch"], s["seq_len"], 384))
    if provider == "transformers":
        fn = module
    else:
        def fn(x):
            with cf.use_backend(provider):
                return cf.ops.grouped_linear(x, module.weight, module.bias)
    run_fwd_bwd(benchmark, device, fn, [x])
