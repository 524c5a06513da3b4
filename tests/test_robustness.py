"""Bad input, edge shapes, NaN/inf and overflow, property-based checks, determinism, backends that fail to
load, damaged checkpoints: nothing quietly wrong, nothing that takes the process down."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import convbert_fast as cf
from conftest import NO_GPU, TRITON_ON_CPU, make_config
from convbert_fast.ops.dynamic_span_conv import dynamic_span_conv_eager
from convbert_fast.ops.grouped_linear import grouped_linear_eager
from convbert_fast.ops.separable_conv1d import separable_conv1d_eager
from samples import span_inputs

# each against `eager`, the transformers math; on CPU tensors (Triton: its interpreter) and on a GPU
FAST_BACKENDS = ["cpp", pytest.param("triton", marks=TRITON_ON_CPU)]
GPU_BACKENDS = ["cpp", "triton"]


def small_model(cls=cf.ConvBertModel, **overrides):
    torch.manual_seed(0)
    return cls(make_config("small", **overrides)).eval()


# --- the host CPU -------------------------------------------------------------------------------------------------


def _cpu_has_avx512_fp16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " avx512_fp16" in line for line in cpuinfo)
    except OSError:
        return False


# On such CPUs oneDNN's JIT of an fp16 depthwise kernel with K >= 33 never returns (torch 2.13): without the guard in
# separable_conv1d_eager this child hangs. A child process, because no timeout can interrupt a thread stuck in C++.
WIDE_FP16_CONV = """
import torch, convbert_fast as cf
cf.set_backend("eager")
x = torch.randn(1, 70, 8, dtype=torch.float16, requires_grad=True)
taps, pointwise, bias = torch.randn(8, 1, 63).half(), torch.randn(16, 8, 1).half(), torch.zeros(16).half()
cf.ops.separable_conv1d(x, taps, pointwise, bias).sum().backward()
print("returned")
"""


@pytest.mark.skipif(
    not _cpu_has_avx512_fp16(),
    reason="the oneDNN fp16 depthwise hang needs a CPU with AVX512-FP16 (`grep avx512_fp16 /proc/cpuinfo`); this one "
    "has none, so the test could not fail here",
)
def test_eager_fp16_wide_depthwise_conv_returns_on_avx512_fp16_cpus():
    try:
        child = subprocess.run([sys.executable, "-c", WIDE_FP16_CONV], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("an fp16 depthwise conv with K=63 on this CPU did not return within 180 s (oneDNN's JIT hang)")
    assert child.returncode == 0 and "returned" in child.stdout, child.stderr[-2000:]


# --- the model's entry points -------------------------------------------------------------------------------------

BAD_MODEL_CALLS = [
    ("float ids", dict(input_ids=torch.rand(2, 8)), TypeError, "`input_ids` must hold integer token ids"),
    (
        "3-D ids",
        dict(input_ids=torch.ones(2, 8, 1, dtype=torch.long)),
        ValueError,
        r"`input_ids` must have shape \[batch, seq_len\]",
    ),
    (
        "embeds width",
        dict(inputs_embeds=torch.rand(2, 8, 100)),
        ValueError,
        r"`inputs_embeds` must have shape \[batch, seq_len, 128\]",
    ),
    (
        "int embeds",
        dict(inputs_embeds=torch.ones(2, 8, 128, dtype=torch.long)),
        TypeError,
        "`inputs_embeds` must have a floating",
    ),
    (
        "mask length",
        dict(input_ids=torch.ones(2, 8, dtype=torch.long), attention_mask=torch.ones(2, 7)),
        ValueError,
        r"`attention_mask` must have shape \[2, 8\]",
    ),
    (
        "token types",
        dict(input_ids=torch.ones(2, 8, dtype=torch.long), token_type_ids=torch.zeros(3, 8, dtype=torch.long)),
        ValueError,
        r"`token_type_ids` must have shape \[2, 8\]",
    ),
    (
        "positions",
        dict(input_ids=torch.ones(2, 8, dtype=torch.long), position_ids=torch.arange(9)[None]),
        ValueError,
        "`position_ids` must have shape",
    ),
    (
        "ids on another device",
        dict(input_ids=torch.ones(2, 8, dtype=torch.long, device="meta")),
        ValueError,
        "`input_ids` is on meta but the model is on cpu",
    ),
    (
        "mask not a tensor",
        dict(input_ids=torch.ones(2, 8, dtype=torch.long), attention_mask=[[1] * 8] * 2),
        TypeError,
        "`attention_mask` must be a torch.Tensor",
    ),
]


@pytest.mark.parametrize("description,kwargs,exc,pattern", BAD_MODEL_CALLS, ids=[c[0] for c in BAD_MODEL_CALLS])
def test_bad_model_inputs_raise_clearly(description, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        small_model()(**kwargs)


def test_bad_encoder_states_raise_clearly():
    model = small_model(is_decoder=True, add_cross_attention=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`encoder_hidden_states` must have shape \[2, encoder_len, 256\]"):
        model(ids, encoder_hidden_states=torch.rand(2, 5, 100))
    with pytest.raises(ValueError, match=r"`encoder_attention_mask` must have shape \[2, 5\]"):
        model(ids, encoder_hidden_states=torch.rand(2, 5, 256), encoder_attention_mask=torch.ones(2, 6))


@pytest.mark.timeout(300)  # the Triton interpreter runs a whole model: 55 s loaded at L=64
@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
@pytest.mark.parametrize("batch,seq_len", [(0, 8), (2, 1), (2, 3), (1, 64)])  # B = 0, L = 1, L < K, L = max
def test_edge_shapes_through_the_model(backend_name, batch, seq_len, rng):
    model = small_model()
    ids = torch.randint(1, 99, (batch, seq_len), generator=rng)
    with torch.no_grad():
        with cf.use_backend("eager"):
            expected = model(ids).last_hidden_state
        with cf.use_backend(backend_name):
            got = model(ids).last_hidden_state
    assert got.shape == (batch, seq_len, 256)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- NaN, inf and overflow spread as in the eager math ------------------------------------------------------------


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_spread_as_in_eager(backend_name, special, rng):
    values, logits = span_inputs(2, 11, 2, 4, 5, gen=rng)
    values[0, 4, 1], values[1, 0, 6] = special, special
    logits[1, 7, 3] = special
    x, dw, pw, bias = torch.randn(2, 11, 6, generator=rng), torch.randn(6, 1, 3), torch.randn(4, 6, 1), torch.randn(4)
    x[0, 5, 2] = special
    gx, gw, gb = torch.randn(2, 11, 6, generator=rng), torch.randn(2, 3, 2), torch.randn(4)
    gx[1, 2, 4] = special
    eager = (
        dynamic_span_conv_eager(values, logits, 2),
        separable_conv1d_eager(x, dw, pw, bias),
        grouped_linear_eager(gx, gw, gb),
    )
    with cf.use_backend(backend_name):
        ours = (
            cf.ops.dynamic_span_conv(values, logits, 2),
            cf.ops.separable_conv1d(x, dw, pw, bias),
            cf.ops.grouped_linear(gx, gw, gb),
        )
    for a, b in zip(ours, eager):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isposinf(), b.isposinf())
        assert torch.equal(a.isneginf(), b.isneginf())
        finite = b.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
def test_extreme_span_logits_stay_finite(backend_name, rng):
    values, logits = span_inputs(2, 11, 2, 4, 5, gen=rng)
    logits = torch.where(torch.rand(logits.shape, generator=rng) > 0.5, 1e4, -1e4)
    expected = dynamic_span_conv_eager(values, logits, 2)
    with cf.use_backend(backend_name):
        out = cf.ops.dynamic_span_conv(values, logits, 2)
    assert expected.isfinite().all() and out.isfinite().all()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
def test_fp16_overflow_as_in_eager(backend_name, rng):
    """The depthwise sum of 9 taps of 3e4 overflows fp16 in both paths; the pointwise weights are positive, so
    the overflow reaches the output as +inf exactly where eager has it."""
    x = torch.full((1, 10, 4), 3e4, dtype=torch.float16)
    x[:, :, 1] = 1.0
    dw = torch.ones(4, 1, 9, dtype=torch.float16)
    pw = torch.rand(3, 4, 1, generator=rng).to(torch.float16) + 0.1
    bias = torch.zeros(3, dtype=torch.float16)
    expected = separable_conv1d_eager(x, dw, pw, bias)
    with cf.use_backend(backend_name):
        out = cf.ops.separable_conv1d(x, dw, pw, bias)
    assert expected.isposinf().any()
    assert torch.equal(out.isposinf(), expected.isposinf()) and not out.isnan().any()


# --- properties over random shapes, dtypes and strides ------------------------------------------------------------


@st.composite
def span_case(draw):
    heads = draw(st.integers(1, 4))
    return dict(
        batch=draw(st.integers(0, 3)),
        seq_len=draw(st.integers(1, 20)),
        heads=heads,
        head_size=draw(st.integers(1, 20)),
        kernel_size=draw(st.sampled_from([1, 3, 5, 7, 9, 15])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _maybe_strided(t, strided):
    if not strided:
        return t
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., 1::2] = t
    return wide[..., 1::2]


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(case=span_case())
def test_span_conv_property(backend_name, case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, length, h, d, k = case["batch"], case["seq_len"], case["heads"], case["head_size"], case["kernel_size"]
    values = _maybe_strided(torch.randn(b, length, h * d, generator=gen, dtype=case["dtype"]), case["strided"])
    logits = _maybe_strided(torch.randn(b, length, h * k, generator=gen, dtype=case["dtype"]) * 3, case["strided"])
    with cf.use_backend(backend_name):
        out = cf.ops.dynamic_span_conv(values, logits, h)
    tol = 1e-5 if case["dtype"] == torch.float32 else 1e-12
    torch.testing.assert_close(out, dynamic_span_conv_eager(values, logits, h), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(0, 3),
    seq_len=st.integers(1, 16),
    channels=st.integers(1, 24),
    out_channels=st.integers(1, 24),
    kernel_size=st.sampled_from([1, 3, 5, 9]),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_separable_conv_property(backend_name, batch, seq_len, channels, out_channels, kernel_size, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _maybe_strided(torch.randn(batch, seq_len, channels, generator=gen), strided)
    dw, pw = torch.randn(channels, 1, kernel_size, generator=gen), torch.randn(out_channels, channels, 1, generator=gen)
    bias = torch.randn(out_channels, generator=gen)
    with cf.use_backend(backend_name):
        out = cf.ops.separable_conv1d(x, dw, pw, bias)
    torch.testing.assert_close(out, separable_conv1d_eager(x, dw, pw, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(0, 20),
    groups=st.integers(1, 4),
    group_in=st.integers(1, 24),
    group_out=st.integers(1, 24),
    gelu=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grouped_linear_property(backend_name, rows, groups, group_in, group_out, gelu, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _maybe_strided(torch.randn(rows, groups * group_in, generator=gen), strided)
    weight, bias = (
        torch.randn(groups, group_in, group_out, generator=gen),
        torch.randn(groups * group_out, generator=gen),
    )
    activation = "gelu" if gelu else None
    with cf.use_backend(backend_name):
        out = cf.ops.grouped_linear(x, weight, bias, activation=activation)
    expected = grouped_linear_eager(x, weight, bias, activation)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


# --- determinism --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
def test_backward_is_bitwise_repeatable_under_deterministic_algorithms(backend_name, rng):
    inputs = [
        torch.randn(2, 13, 16, generator=rng),
        torch.randn(2, 13, 2 * 9, generator=rng),  # span conv
        torch.randn(2, 13, 8, generator=rng),
        torch.randn(8, 1, 9),
        torch.randn(16, 8, 1),
        torch.randn(16),
        torch.randn(2, 13, 16, generator=rng),
        torch.randn(2, 8, 12),
        torch.randn(24),  # grouped
    ]

    def loss(t):
        span = cf.ops.dynamic_span_conv(t[0], t[1], 2)
        sep = cf.ops.separable_conv1d(t[2], t[3], t[4], t[5], multiplier=span)
        return cf.ops.grouped_linear(sep + t[6], t[7], t[8], activation="gelu").square().sum()

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in inputs]
            with cf.use_backend(backend_name):
                loss(leaves).backward()
            runs.append([t.grad for t in leaves])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --- a backend that fails to load ---------------------------------------------------------------------------------

SIMULATE = {
    "cpp": "import sys; sys.modules['convbert_fast._C'] = None  # as if the extension were missing",
    "triton": "import sys; sys.modules['triton'] = None  # as if triton were not installed",
}


@pytest.mark.timeout(300)  # a child process imports torch, transformers and convbert_fast: 19 s loaded
@pytest.mark.parametrize("broken", ["cpp", "triton"])
def test_a_backend_that_fails_to_load(broken):
    code = f"""{SIMULATE[broken]}
import warnings, torch
import convbert_fast as cf
from convbert_fast.cli import main
main(["info"])
status = cf.available_backends()[{broken!r}]
assert status != "ok", status
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        out = cf.ops.grouped_linear(torch.ones(2, 4), torch.ones(2, 2, 3), torch.zeros(6))
assert out.shape == (2, 6)
print("WARNINGS", sum("falls back" in str(w.message) for w in caught))
try:
    cf.set_backend({broken!r})
except RuntimeError as error:
    print("EXPLICIT", error)
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    if broken == "cpp":
        assert "cpp          convbert_fast._C did not load" in out  # info says why
        assert "WARNINGS 1" in out  # auto on the CPU wanted cpp: it warned once and used eager
    else:
        assert "triton       triton did not import" in out
        assert "WARNINGS 0" in out  # auto on the CPU never wanted triton: no fallback to warn about
    assert f"EXPLICIT backend '{broken}' is not available: " in out


# --- checkpoints --------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    return model, tmp_path, tmp_path / "model.safetensors"


def test_missing_and_unexpected_keys_are_reported(saved_model):
    _, path, weights = saved_model
    state = load_file(weights)
    del state["encoder.layer.1.output.dense.bias"]
    state["encoder.extra.weight"] = torch.zeros(3)
    save_file(state, weights, metadata={"format": "pt"})
    _, info = cf.ConvBertModel.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == {"encoder.layer.1.output.dense.bias"}
    assert info["unexpected_keys"] == {"encoder.extra.weight"}


def test_a_wrong_shape_is_refused(saved_model):
    _, path, weights = saved_model
    state = load_file(weights)
    state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(10, 256)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        cf.ConvBertModel.from_pretrained(path)


def test_a_truncated_checkpoint_is_refused_and_the_model_is_untouched(saved_model):
    model, path, weights = saved_model
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorError, match="incomplete metadata"):
        cf.ConvBertModel.from_pretrained(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SafetensorError):
        model.load_state_dict(load_file(weights))  # the file fails before the model is touched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- on a GPU: long sequences and more than 2^31 elements in one call ---------------------------------------------


@NO_GPU
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
def test_16k_tokens_on_gpu(backend_name):
    model = cf.ConvBertModel(make_config("small", max_position_embeddings=16384)).cuda().eval()
    ids = torch.randint(1, 99, (1, 16384), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with cf.use_backend("eager"):
            expected = model(ids).last_hidden_state.float()
        with cf.use_backend(backend_name):
            got = model(ids).last_hidden_state.float()
    assert got.isfinite().all()
    assert (got - expected).abs().max() < 0.1  # bf16 through 2 layers, LayerNorm-scaled outputs


@NO_GPU
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
def test_more_than_2_to_the_31_elements_on_gpu(backend_name):
    """[1, 2^22 + 3, 512] fp16 values (2^31 + 1536 elements): 64-token stretches at the start, the middle and the
    end (the last 3 rows start past element 2^31) checked against the eager math on a slice around each."""
    seq_len, heads, head_size, kernel_size = 2**22 + 3, 8, 64, 9
    gen = torch.Generator(device="cuda").manual_seed(0)
    values = torch.randn(1, seq_len, heads * head_size, device="cuda", dtype=torch.float16, generator=gen)
    logits = torch.randn(1, seq_len, heads * kernel_size, device="cuda", dtype=torch.float16, generator=gen)
    assert values.numel() > 2**31
    with cf.use_backend(backend_name):
        out = cf.ops.dynamic_span_conv(values, logits, heads)
    half = kernel_size // 2
    stretches = [(0, 64), (seq_len // 2, seq_len // 2 + 64), (seq_len - 64, seq_len)]
    assert (seq_len - 1) * heads * head_size > 2**31  # the last row checked starts past 2^31
    for start, stop in stretches:
        # the slice holds every token the stretch's windows read; at the sequence's ends its zero padding is real
        low, high = max(0, start - half), min(seq_len, stop + half)
        expected = dynamic_span_conv_eager(values[:, low:high].float(), logits[:, low:high].float(), heads)
        got = out[:, start:stop].float()
        torch.testing.assert_close(got, expected[:, start - low : stop - low], rtol=2e-3, atol=2e-3)
