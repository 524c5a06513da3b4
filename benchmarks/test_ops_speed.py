"""Each op, forward + backward, side by side: transformers' eager code against our backends.

    pytest benchmarks --benchmark-only --benchmark-group-by=group      (add --bench-device cuda on a GPU)

Shapes are the issues': B=8, L=512 on the CPU (B=32 on a GPU), 6 conv heads of 64 (A=384, C=768), K=9;
grouped linear 384 -> 1536 in 2 groups (conv-bert-medium-small's FFN). CPU: fp32; GPU: bf16 (--bench-dtype
chooses: `--bench-dtype bf16` on the CPU for its bf16 kernels). The Triton
provider runs on a GPU (on the CPU only in the tiny smoke run, in Triton's interpreter). On a GPU, `cpp` runs
the tiled (v2) CUDA kernels and `cpp-v1` the first, general ones (CONVBERT_FAST_CUDA_KERNELS=v1, issue 17):
side by side until one of them is deleted.

The two convs also run packed (issue 23): the B rows with lengths uniform in [L/2, L] (seeded), packed into one
row [1, T, ...] with cu_seqlens, in groups "<op> packed ..."; the padded batch costs what the B x L groups cost
(the convs read every padded row), so those are the comparison. transformers has no packed form.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from transformers.models.convbert import modeling_convbert as hf

import convbert_fast as cf
from convbert_fast.bench.providers import span_conv_bytes
from convbert_fast.bench.record import device_name
from convbert_fast.bench.timing import copy_bandwidth
from convbert_fast.ops.backend import gpu_family

PROVIDERS = ["transformers", "eager", "cpp", "cpp-v1", "triton"]
PACKED_PROVIDERS = [p for p in PROVIDERS if p != "transformers"]  # transformers' convs take no sequence boundaries


def skip_unmeasurable(provider, device, tiny):
    if provider == "triton" and device.type == "cpu" and not tiny:
        pytest.skip("Triton runs on the CPU only in its interpreter: not a speed to measure")
    if provider == "cpp-v1" and device.type != "cuda":
        pytest.skip("cpp-v1 picks the CUDA kernels; on the CPU it is the cpp provider again")


@contextlib.contextmanager
def backend_of(provider):
    """The provider's backend; for cpp-v1, the cpp backend with the general CUDA kernels (read at each launch)."""
    saved = os.environ.get("CONVBERT_FAST_CUDA_KERNELS")
    os.environ["CONVBERT_FAST_CUDA_KERNELS"] = "v1" if provider == "cpp-v1" else "v2"
    try:
        with cf.use_backend(provider.removesuffix("-v1")):
            yield
    finally:
        if saved is None:
            del os.environ["CONVBERT_FAST_CUDA_KERNELS"]
        else:
            os.environ["CONVBERT_FAST_CUDA_KERNELS"] = saved


def shapes(device, tiny, dtype):
    if tiny:  # every dimension small: the smoke run executes Triton in its interpreter
        return dict(batch=2, seq_len=16, dtype=torch.float32, channels=32, heads=2, head_size=8, ffn=(32, 64))
    return dict(
        batch=32 if device.type == "cuda" else 8,
        seq_len=512,
        channels=768,
        heads=6,
        head_size=64,
        ffn=(384, 1536),
        dtype=dtype,
    )


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
    # what `bench --choose` needs to name the GPU family the record fills MEASURED_CUDA_CHOICE for
    benchmark.extra_info["device"] = device_name(device)
    if device.type == "cuda":
        benchmark.extra_info["gpu_family"] = gpu_family(device.index or 0)


def leaves(device, dtype, *shapes_, scale=1.0):
    return [(torch.randn(*s, device=device) * scale).to(dtype).requires_grad_() for s in shapes_]


def span_conv_transformers(values, logits, heads, kernel_size=9):
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
def test_dynamic_span_conv(benchmark, provider, device, tiny, bench_dtype):
    skip_unmeasurable(provider, device, tiny)
    s = shapes(device, tiny, bench_dtype)
    benchmark.group = "dynamic_span_conv fwd+bwd"
    heads = s["heads"]
    inputs = leaves(
        device, s["dtype"], (s["batch"], s["seq_len"], heads * s["head_size"]), (s["batch"], s["seq_len"], heads * 9)
    )
    if provider == "transformers":

        def fn(v, k):
            return span_conv_transformers(v, k, heads)
    else:

        def fn(v, k):
            with backend_of(provider):
                return cf.ops.dynamic_span_conv(v, k, heads)

    run_fwd_bwd(benchmark, device, fn, inputs)
    # memory-bound: the share of the copy bandwidth measured in this run
    moved = span_conv_bytes(*inputs)
    benchmark.extra_info["bytes_moved"] = moved
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["bandwidth_fraction"] = moved / seconds / copy_bandwidth(device)


@pytest.mark.parametrize("multiply", [False, True], ids=["conv", "conv*query"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_separable_conv1d(benchmark, provider, multiply, device, tiny, bench_dtype):
    skip_unmeasurable(provider, device, tiny)
    s = shapes(device, tiny, bench_dtype)
    benchmark.group = "separable_conv1d" + (" * query" if multiply else "") + " fwd+bwd"
    config = cf.ConvBertConfig()
    channels, out_channels = s["channels"], s["heads"] * s["head_size"]
    module = hf.SeparableConv1D(config, channels, out_channels, 9).to(device, s["dtype"])
    x, query = leaves(
        device, s["dtype"], (s["batch"], s["seq_len"], channels), (s["batch"], s["seq_len"], out_channels)
    )
    if provider == "transformers":

        def fn(x, query):  # as ConvBertSelfAttention does it: transpose in, conv, transpose out, multiply
            out = module(x.transpose(1, 2)).transpose(1, 2)
            return torch.multiply(out, query) if multiply else out
    else:

        def fn(x, query):
            with backend_of(provider):
                return cf.ops.separable_conv1d(
                    x,
                    module.depthwise.weight,
                    module.pointwise.weight,
                    module.bias,
                    multiplier=query if multiply else None,
                )

    run_fwd_bwd(benchmark, device, fn, [x, query])


def packed_rows(batch, seq_len, device):
    """(B lengths uniform in [L/2, L], fixed by a seed, as the benchmark's padded rows; their int32 offsets)."""
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=torch.Generator().manual_seed(23))
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device, torch.int32)
    return lengths.tolist(), offsets


def run_packed(benchmark, provider, device, fn, inputs, lengths, seq_len):
    """run_fwd_bwd on a packed row; a backend whose kernels refuse offsets on this device is skipped, saying so."""
    benchmark.extra_info.update(tokens=sum(lengths), padded_tokens=len(lengths) * seq_len)
    try:
        run_fwd_bwd(benchmark, device, fn, inputs)
    except NotImplementedError as error:
        pytest.skip(f"{provider} takes no cu_seqlens on {device.type}: {error}")


@pytest.mark.parametrize("provider", PACKED_PROVIDERS)
def test_dynamic_span_conv_packed(benchmark, provider, device, tiny, bench_dtype):
    skip_unmeasurable(provider, device, tiny)
    s = shapes(device, tiny, bench_dtype)
    lengths, offsets = packed_rows(s["batch"], s["seq_len"], device)
    benchmark.group = f"dynamic_span_conv packed B={s['batch']} L={s['seq_len']} fwd+bwd"
    heads, total = s["heads"], sum(lengths)
    inputs = leaves(device, s["dtype"], (1, total, heads * s["head_size"]), (1, total, heads * 9))

    def fn(v, k):
        with backend_of(provider):
            return cf.ops.dynamic_span_conv(v, k, heads, cu_seqlens=offsets)

    run_packed(benchmark, provider, device, fn, inputs, lengths, s["seq_len"])
    moved = span_conv_bytes(*inputs)
    benchmark.extra_info["bytes_moved"] = moved
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["bandwidth_fraction"] = moved / benchmark.stats.stats.median / copy_bandwidth(device)


@pytest.mark.parametrize("multiply", [False, True], ids=["conv", "conv*query"])
@pytest.mark.parametrize("provider", PACKED_PROVIDERS)
def test_separable_conv1d_packed(benchmark, provider, multiply, device, tiny, bench_dtype):
    skip_unmeasurable(provider, device, tiny)
    s = shapes(device, tiny, bench_dtype)
    lengths, offsets = packed_rows(s["batch"], s["seq_len"], device)
    benchmark.group = (
        f"separable_conv1d{' * query' if multiply else ''} packed B={s['batch']} L={s['seq_len']} fwd+bwd"
    )
    channels, out_channels, total = s["channels"], s["heads"] * s["head_size"], sum(lengths)
    module = hf.SeparableConv1D(cf.ConvBertConfig(), channels, out_channels, 9).to(device, s["dtype"])
    x, query = leaves(device, s["dtype"], (1, total, channels), (1, total, out_channels))

    def fn(x, query):
        with backend_of(provider):
            weights = (module.depthwise.weight, module.pointwise.weight, module.bias)
            multiplier = query if multiply else None
            return cf.ops.separable_conv1d(x, *weights, multiplier=multiplier, cu_seqlens=offsets)

    run_packed(benchmark, provider, device, fn, [x, query], lengths, s["seq_len"])


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_grouped_linear(benchmark, provider, activation, device, tiny, bench_dtype):
    skip_unmeasurable(provider, device, tiny)
    if provider == "cpp-v1":
        pytest.skip("grouped_linear has no CUDA kernel of its own (cuBLAS): nothing to compare")
    s = shapes(device, tiny, bench_dtype)
    benchmark.group = f"grouped_linear {s['ffn'][0]}->{s['ffn'][1]} G=2{' + GELU' if activation else ''} fwd+bwd"
    module = hf.GroupedLinearLayer(*s["ffn"], 2).to(device, s["dtype"])
    torch.nn.init.normal_(module.weight, std=0.02)
    torch.nn.init.zeros_(module.bias)
    (x,) = leaves(device, s["dtype"], (s["batch"], s["seq_len"], s["ffn"][0]))
    if provider == "transformers":

        def fn(x):  # ConvBertIntermediate: the grouped layer, then the activation
            return torch.nn.functional.gelu(module(x)) if activation else module(x)
    else:

        def fn(x):
            with backend_of(provider):
                return cf.ops.grouped_linear(x, module.weight, module.bias, activation=activation)

    run_fwd_bwd(benchmark, device, fn, [x])


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "triton"])  # no Triton kernel for this op
def test_dropout_add_layer_norm(benchmark, provider, device, tiny, bench_dtype):
    skip_unmeasurable(provider, device, tiny)
    s = shapes(device, tiny, bench_dtype)
    benchmark.group = f"dropout_add_layer_norm C={s['channels']} p=0.1 fwd+bwd"
    norm = torch.nn.LayerNorm(s["channels"], eps=1e-12).to(device, s["dtype"])
    dropout = torch.nn.Dropout(0.1)
    x, residual = leaves(device, s["dtype"], *[(s["batch"], s["seq_len"], s["channels"])] * 2)
    if provider == "transformers":

        def fn(x, residual):  # ConvBertSelfOutput / ConvBertOutput: dropout, add, LayerNorm
            return norm(dropout(x) + residual)
    else:

        def fn(x, residual):
            with backend_of(provider):
                return cf.ops.dropout_add_layer_norm(x, residual, norm.weight, norm.bias, 0.1, 1e-12, training=True)

    run_fwd_bwd(benchmark, device, fn, [x, residual])
