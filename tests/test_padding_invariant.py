"""The padding-invariant mode (config.padding_invariant): every sequence of a padded or packed batch gives what it
gives alone, for every class of the family, forward and backward, on every CPU backend and both ways of running
padded rows (unpadded into one packed row, or in place with masked conv inputs); the default mode does not (the
same check fails there), and stays transformers' (tests/test_parity.py). Packed rows in DataCollatorWithFlattening's
form give the losses and gradients of the same sequences padded."""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_ON_CPU
from transformers import DataCollatorWithFlattening

import convbert_fast as cf
from convbert_fast import modeling, sequences

LENGTHS = [24, 1, 9, 17, 3, 12, 8, 20]  # 8 sequences, 1 to L tokens
SEQ_LEN = 24
CPU_BACKENDS = [
    pytest.param("eager", id="eager"),
    pytest.param("cpp", id="cpp"),
    pytest.param("triton", id="triton", marks=TRITON_ON_CPU),
]


def make_config(**overrides):
    # conv-bert-medium-small's features in miniature: an embedding projection, grouped FFN, K = 9, no dropout
    settings = dict(
        vocab_size=99, hidden_size=64, num_attention_heads=4, intermediate_size=128, embedding_size=32,
        num_groups=2, num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return cf.ConvBertConfig(**{**settings, **overrides})


# class -> (num_labels, the output compared per sequence, whether it has one row per token)
HEADS = {
    "ConvBertModel": (3, lambda out: out.last_hidden_state, True),
    "ConvBertForMaskedLM": (3, lambda out: out.logits, True),
    "ConvBertForTokenClassification": (3, lambda out: out.logits, True),
    "ConvBertForQuestionAnswering": (2, lambda out: torch.stack([out.start_logits, out.end_logits], -1), True),
    "ConvBertForSequenceClassification": (3, lambda out: out.logits, False),
    "ConvBertForMultipleChoice": (3, lambda out: out.logits.reshape(-1, 1), False),
}


def build(name, padding_invariant=True):
    torch.manual_seed(0)
    num_labels = HEADS[name][0]
    model = getattr(cf, name)(make_config(num_labels=num_labels, padding_invariant=padding_invariant))
    return model.eval()  # no dropout: the comparison is of the math


def padded_batch(lengths, seq_len, embedding_size, gen, left=False):
    """inputs_embeds [B, L, E] (random, so that their gradient is an input gradient) and the attention mask."""
    embeds = torch.randn(len(lengths), seq_len, embedding_size, generator=gen)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, seq_len - n :] = 1
        else:
            mask[i, :n] = 1
    return embeds, mask


def real(mask_row):
    return mask_row.nonzero().flatten()


def call(model, name, embeds, mask):
    """The class's output on a batch of sequences [B, L, E]; multiple choice sees them as [B/2, 2 choices, L]."""
    if name == "ConvBertForMultipleChoice" and mask is not None:
        embeds, mask = embeds.reshape(-1, 2, *embeds.shape[1:]), mask.reshape(-1, 2, mask.shape[-1])
    return HEADS[name][1](model(inputs_embeds=embeds, attention_mask=mask))


def check_invariance(model, name, lengths, gen, left=False, tolerance=1e-5, device="cpu"):
    """Each sequence batched (padded) against its own run alone, without padding, on the eager backend (the
    seed's math, as transformers runs it): outputs, and the gradients of the parameters and of inputs_embeds of
    a loss that sums a fixed random projection of each sequence's output."""
    per_token = HEADS[name][2]
    embeds, mask = padded_batch(lengths, SEQ_LEN, model.config.embedding_size, gen, left)
    embeds, mask = embeds.to(device, model.dtype).requires_grad_(), mask.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    out = call(model, name, embeds, mask)
    weights = torch.randn(out.shape, generator=gen).to(device, out.dtype)
    loss = sum((weights[i, real(mask[i])] * out[i, real(mask[i])]).sum() if per_token else (weights[i] * out[i]).sum()
               for i in range(len(lengths)))  # fmt: skip
    grads = torch.autograd.grad(loss, [embeds, *params], allow_unused=True)
    expected_param_grads = [torch.zeros_like(p) for p in params]
    with cf.use_backend("eager"):
        for i in range(len(lengths)):
            tokens = real(mask[i])
            alone_embeds = embeds[i : i + 1, tokens].detach().requires_grad_()
            if name == "ConvBertForMultipleChoice":  # one choice alone: [1, 1, n]
                alone = HEADS[name][1](model(inputs_embeds=alone_embeds[:, None]))
            else:
                alone = call(model, name, alone_embeds, None)
            got = out[i, tokens] if per_token else out[i]
            torch.testing.assert_close(
                got, alone[0], rtol=tolerance, atol=tolerance, msg=lambda m: f"sequence {i}: {m}"
            )
            w = weights[i, tokens] if per_token else weights[i]
            alone_grads = torch.autograd.grad((w * alone[0]).sum(), [alone_embeds, *params], allow_unused=True)
            assert_close_at_scale(
                grads[0][i, tokens], alone_grads[0][0], f"d(inputs_embeds) of sequence {i}", tolerance
            )
            for total, g in zip(expected_param_grads, alone_grads[1:]):
                if g is not None:
                    total += g
    pads = mask == 0
    assert grads[0][pads].abs().max() == 0 if pads.any() else True  # nothing flows into the padding
    for p_name, got, want in zip([n for n, p in model.named_parameters() if p.requires_grad], grads[1:],
                                 expected_param_grads):  # fmt: skip
        assert_close_at_scale(torch.zeros_like(want) if got is None else got, want, f"d({p_name})", tolerance)


def assert_close_at_scale(got, want, what, tolerance):
    """Gradients are sums over every token of the batch, added in another order than the sequences' own sums:
    their fp32 rounding grows with their size, so the bound is `tolerance` times the larger of 1 and the
    gradient's largest entry (the same check in fp64 finds 1e-15: test_invariance_is_exact_in_fp64)."""
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    error = (got - want).abs().max().item() if want.numel() else 0.0
    assert error <= tolerance * scale, f"{what}: {error:.3e} over {tolerance} x {scale:.3e}"


@pytest.fixture(params=["unpad", "masked"])
def plan(request, monkeypatch):
    """Padded rows gathered into one packed row (any padding unpads), or run in place (none does); the test
    checks that the asked path ran."""
    monkeypatch.setattr(sequences, "UNPAD_BELOW_REAL_FRACTION", 1.0 if request.param == "unpad" else -1.0)
    calls = []
    original = modeling.ConvBertModel.packed_forward

    def counted(self, *args, **kwargs):
        calls.append(args[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling.ConvBertModel, "packed_forward", counted)
    yield request.param, calls


# Triton's interpreter takes 25-80 s a head here on an AVX2 AMD EPYC (half of the suite's time went to it); the
# heads run the same encoder ops, so Triton gets the base model and the one head that reshapes its rows
TRITON_HEADS = ("ConvBertModel", "ConvBertForMultipleChoice")


@pytest.mark.timeout(600)  # the Triton cases in Triton's interpreter
@pytest.mark.parametrize(
    "name, backend",
    [pytest.param(name, *backend.values, marks=backend.marks, id=f"{name}-{backend.id}")
     for name in HEADS for backend in CPU_BACKENDS if backend.id != "triton" or name in TRITON_HEADS],
)  # fmt: skip
def test_each_sequence_gives_what_it_gives_alone(name, backend, plan, rng):
    plan_name, calls = plan
    if backend == "eager" and plan_name == "unpad":
        pytest.skip("the eager backend is the seed's math: padded rows always run in place there")
    model = build(name)
    with cf.use_backend(backend):
        check_invariance(model, name, LENGTHS, rng)
    assert calls == (["unpad"] if plan_name == "unpad" else [])


def test_invariance_is_exact_in_fp64(monkeypatch, rng):
    """In fp64 the batched and the lone sequences agree to rounding (1e-15 relative here): what remains in fp32
    is the order of additions, not a difference in the math."""
    monkeypatch.setattr(sequences, "UNPAD_BELOW_REAL_FRACTION", 1.0)
    model = build("ConvBertForSequenceClassification").double()
    with cf.use_backend("cpp"):
        check_invariance(model, "ConvBertForSequenceClassification", LENGTHS, rng, tolerance=1e-12)


@pytest.mark.parametrize("plan_name", ["unpad", "masked"])
def test_left_padding_gives_what_each_sequence_gives_alone(plan_name, monkeypatch, rng):
    """Left-padded rows count their positions from their first real token, and classify it."""
    monkeypatch.setattr(sequences, "UNPAD_BELOW_REAL_FRACTION", 1.0 if plan_name == "unpad" else -1.0)
    for name in ("ConvBertModel", "ConvBertForSequenceClassification"):
        check_invariance(build(name), name, LENGTHS, rng, left=True)


def test_the_default_mode_fails_the_same_check(rng):
    """transformers' ConvBERT (and ours by default) lets the convs read the padding: the check above fails."""
    with pytest.raises(AssertionError, match="sequence 1"):  # the 1-token sequence, among 23 pads
        check_invariance(build("ConvBertModel", padding_invariant=False), "ConvBertModel", LENGTHS, rng)


def test_a_padded_row_changes_by_its_padding_in_the_default_mode_only(rng):
    """The issue's measurement: a 10-token sequence alone, then padded to 16 with its mask."""
    model = build("ConvBertModel", padding_invariant=False)
    ids = torch.randint(5, 99, (1, 10), generator=rng)
    padded, mask = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1), (torch.arange(16) < 10).long()[None]
    for invariant in (False, True):
        model.config.padding_invariant = invariant
        alone = model(ids).last_hidden_state
        batched = model(padded, attention_mask=mask).last_hidden_state[:, :10]
        diff = (alone - batched).abs().max().item()
        assert (diff > 1e-3) if not invariant else (diff < 1e-5), (invariant, diff)


# --- packed rows ---------------------------------------------------------------------------------------------------


def packed_and_padded(lengths, gen):
    ids = [torch.randint(5, 99, (n,), generator=gen) for n in lengths]
    mlm_labels = [torch.where(torch.rand(n, generator=gen) < 0.3, t, -100) for n, t in zip(lengths, ids)]
    for labels in mlm_labels:
        labels[0] = -100  # the [CLS] position, which DataCollatorWithFlattening marks as a separator
    packed = DataCollatorWithFlattening()(
        [{"input_ids": t.tolist(), "labels": y.tolist()} for t, y in zip(ids, mlm_labels)]
    )
    padded_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    padded_labels = torch.full_like(padded_ids, -100)
    for i, (t, y) in enumerate(zip(ids, mlm_labels)):
        padded_ids[i, : len(t)], padded_labels[i, : len(y)] = t, y
    return packed, (padded_ids, (padded_ids != 0).long(), padded_labels)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_rows_give_the_losses_and_gradients_of_the_same_sequences_padded(backend, rng):
    """DataCollatorWithFlattening's batch (one row, position_ids restarting at 0) against the same sequences
    padded, both in the padding-invariant mode: masked-LM loss, classification loss (one label per packed
    sequence), and every parameter's gradient, within 1e-5."""
    lengths = [7, 1, 12, 5, 9]
    packed, (ids, mask, mlm_labels) = packed_and_padded(lengths, rng)
    assert packed["input_ids"].shape == (1, sum(lengths)) and "position_ids" in packed
    class_labels = torch.randint(0, 3, (len(lengths),), generator=rng)
    for name, packed_labels, padded_labels in (
        ("ConvBertForMaskedLM", packed["labels"], mlm_labels),
        ("ConvBertForSequenceClassification", class_labels, class_labels),
    ):
        model = build(name)
        with cf.use_backend(backend):
            packed_out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed_labels)
            padded_out = model(input_ids=ids, attention_mask=mask, labels=padded_labels)
            params = list(model.parameters())
            packed_grads = torch.autograd.grad(packed_out.loss, params, allow_unused=True)
            padded_grads = torch.autograd.grad(padded_out.loss, params, allow_unused=True)
        torch.testing.assert_close(packed_out.loss, padded_out.loss, rtol=1e-5, atol=1e-5)
        if name == "ConvBertForSequenceClassification":
            assert packed_out.logits.shape == (len(lengths), 3)  # one row of logits per packed sequence
        for a, b in zip(packed_grads, padded_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packed_rows_without_the_mode_are_one_sequence(rng):
    """The default mode stays transformers': position ids restarting mean nothing to it (its convs and attention
    cross the boundaries), so the packed output differs from the padded one."""
    packed, (ids, mask, _) = packed_and_padded([7, 12], rng)
    model = build("ConvBertModel", padding_invariant=False)
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).last_hidden_state[0, 7:]
    model.config.padding_invariant = True
    assert (out - model(input_ids=ids[1:], attention_mask=mask[1:]).last_hidden_state[0]).abs().max() > 1e-3


# --- what the mode refuses, and tracing -------------------------------------------------------------------------


def test_masks_with_holes_3d_masks_and_packed_padding_are_refused(rng):
    model = build("ConvBertModel")
    ids = torch.randint(5, 99, (2, 8), generator=rng)
    holes = torch.tensor([[1, 1, 0, 1, 0, 0, 0, 0], [1] * 8])
    with pytest.raises(ValueError, match=r"attention_mask row 0 has padding between real tokens \(\[1, 1, 0, 1,"):
        model(ids, attention_mask=holes)
    with pytest.raises(ValueError, match=r"needs a 2-D attention_mask \[batch, seq_len\]"):
        model(ids, attention_mask=torch.ones(2, 8, 8))
    restarting = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    with pytest.raises(ValueError, match="packed rows .* cannot also hold padding"):
        model(ids, attention_mask=torch.tensor([[1] * 6 + [0, 0], [1] * 8]), position_ids=restarting)
    with pytest.raises(ValueError, match="ConvBertForMultipleChoice takes one choice per row"):
        build("ConvBertForMultipleChoice")(ids[None], position_ids=restarting[None])
    with pytest.raises(ValueError, match="answer positions index rows, but these rows are packed"):
        build("ConvBertForQuestionAnswering")(ids[:1], position_ids=restarting[:1], start_positions=torch.tensor([1]),
                                                end_positions=torch.tensor([2]))  # fmt: skip


def test_a_packed_sequence_longer_than_the_position_table_is_refused(rng):
    model = build("ConvBertModel")
    positions = torch.cat([torch.arange(65), torch.arange(3)])[None]
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_position_embeddings = 64"):
        model(torch.randint(5, 99, (1, 68), generator=rng), position_ids=positions)


@pytest.mark.timeout(300)  # compiles a forward and a backward
def test_compiled_padding_invariant_model_runs_padded_rows_in_place(rng):
    """Under torch.compile the padded rows run in place (no values to read while tracing): one graph, no break,
    the eager results."""
    model = build("ConvBertModel")
    embeds, mask = padded_batch(LENGTHS, SEQ_LEN, model.config.embedding_size, rng)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(
        compiled(inputs_embeds=embeds, attention_mask=mask).last_hidden_state,
        model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state,
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_packed_attention_on_cuda_matches_the_padded_sdpa(dtype):
    """On a GPU in fp16/bf16 without dropout, packed attention takes torch's varlen flash attention where this
    torch has it: the same context as the sequences padded for masked SDPA (the CPU's path), forward and
    backward, within the dtype's rounding."""
    gen = torch.Generator().manual_seed(0)
    lengths, heads, head_size = [37, 1, 0, 128, 64], 6, 64
    packed = sequences.PackedSequences(lengths, "cuda")
    q, k, v = (torch.randn(1, sum(lengths), heads * head_size, generator=gen).to("cuda", dtype).requires_grad_()
               for _ in range(3))  # fmt: skip
    out = packed.attention(q, k, v, heads, 0.0)
    assert sequences._varlen_attention() is not None  # the GPU image's torch (2.11) has it
    padded = sequences.PackedSequences(lengths, "cuda")
    reference = padded.attention(*(t.float() for t in (q, k, v)), heads, 0.0)  # fp32: the padded SDPA path
    grad = torch.randn(out.shape, generator=gen).to("cuda", dtype)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(reference, (q, k, v), grad.float())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton")])
@pytest.mark.parametrize("name", ["ConvBertModel", "ConvBertForSequenceClassification"])
def test_each_sequence_gives_what_it_gives_alone_on_cuda(name, backend, monkeypatch, rng):
    """The CUDA kernels with sequence offsets (unpadded rows), fp32, against each sequence alone on the eager math."""
    monkeypatch.setattr(sequences, "UNPAD_BELOW_REAL_FRACTION", 1.0)
    model = build(name).cuda()
    with cf.use_backend(backend):
        check_invariance(model, name, LENGTHS, rng, device="cuda")


def test_patch_turns_the_mode_on_for_a_transformers_model(rng):
    import transformers

    torch.manual_seed(0)
    theirs = transformers.ConvBertModel(make_config()).eval()
    cf.patch(theirs, padding_invariant=True)
    assert theirs.config.padding_invariant is True
    check_invariance(theirs, "ConvBertModel", LENGTHS[:3], rng)


# few sequences: a loop of SDPA calls; many: groups padded to their longest (equal lengths in one group, tokens
# not contiguous across groups); empty sequences among them
PACKINGS = {
    "loop": [5, 0, 3, 9, 1],
    "groups": [4, 39, 13, 0, 3, 19, 31, 2, 40, 7, 17, 25, 1, 36, 9, 11, 28, 6, 22, 33],
    "one-group": [3] * (sequences.LOOP_AT_MOST_SEQUENCES + 2),
    "neighbour-groups": [40, 38] + [2] * sequences.LOOP_AT_MOST_SEQUENCES,  # two groups, each a run of the row
}


@pytest.mark.parametrize("packing", PACKINGS)
def test_packed_attention_is_each_sequence_attending_to_itself(packing):
    """PackedSequences.attention against the attention math per sequence (softmax(q k^T / sqrt(d)) v, written
    here), fp64, forward and gradcheck; the grouped layout is taken where it is meant to be."""
    lengths, heads, head_size = PACKINGS[packing], 2, 4
    packed = sequences.PackedSequences(lengths, "cpu")
    singles = [g.slots is None for g in packed.groups]
    assert {"loop": all(singles), "groups": 1 < len(singles) < sum(map(bool, lengths)) and not all(singles),
            "one-group": singles == [False], "neighbour-groups": singles == [False, False]}[packing]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, sum(lengths), heads * head_size, generator=gen, dtype=torch.float64).requires_grad_()
               for _ in range(3))  # fmt: skip
    expected, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[0, start : start + n].view(n, heads, head_size).transpose(0, 1) for t in (q, k, v))
        probs = (qs @ ks.transpose(1, 2) / head_size**0.5).softmax(-1)  # [H, n, n]
        expected.append((probs @ vs).transpose(0, 1).reshape(n, heads * head_size))
        start += n
    torch.testing.assert_close(packed.attention(q, k, v, heads, 0.0)[0], torch.cat(expected), rtol=1e-12, atol=1e-12)
    if packing != "groups":  # its 400 tokens' Jacobian: the other two cover the backward's layouts at a tenth of the cost
        assert torch.autograd.gradcheck(lambda *qkv: packed.attention(*qkv, heads, 0.0), (q, k, v))
    else:
        grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(packed.attention(q, k, v, heads, 0.0), (q, k, v), grad)
        want = torch.autograd.grad(torch.cat(expected)[None], (q, k, v), grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_many_sequences_give_what_they_give_alone(monkeypatch, rng):
    """The model (cpp, unpadded) on more sequences than the attention loops over: grouped attention, each sequence
    equal to itself alone, outputs and gradients."""
    monkeypatch.setattr(sequences, "UNPAD_BELOW_REAL_FRACTION", 1.0)
    lengths = [n % SEQ_LEN + 1 for n in PACKINGS["groups"]]
    assert len(lengths) > sequences.LOOP_AT_MOST_SEQUENCES
    with cf.use_backend("cpp"):
        check_invariance(build("ConvBertModel"), "ConvBertModel", lengths, rng)


def test_packed_attention_with_dropout_in_bf16_on_the_cpu_stays_in_each_sequence():
    """Packed attention in bf16 training with dropout on the CPU (the explicit softmax + dropout per sequence,
    which SDPA's math path would run in fp32): a sequence's output does not move when another sequence's keys and
    values change under the same seed (no attention and no dropout draw crosses a boundary), and over many seeded
    draws it averages to the attention without dropout (the kept probabilities rescaled by 1 / (1 - p))."""
    gen = torch.Generator().manual_seed(0)
    lengths, heads, head_size, p = [37, 1, 0, 64, 20], 2, 16, 0.5
    packed = sequences.PackedSequences(lengths, "cpu")
    q, k, v = (torch.randn(1, sum(lengths), heads * head_size, generator=gen).to(torch.bfloat16) for _ in range(3))
    torch.manual_seed(1)
    out = packed.attention(q, k, v, heads, p)
    other = slice(38, 102)  # the 64-token sequence
    k2, v2 = k.clone(), v.clone()
    k2[:, other], v2[:, other] = -k[:, other], 2 * v[:, other]
    torch.manual_seed(1)
    moved = packed.attention(q, k2, v2, heads, p)
    keep = torch.ones(sum(lengths), dtype=torch.bool)
    keep[other] = False
    assert torch.equal(out[:, keep], moved[:, keep]) and not torch.equal(out[:, other], moved[:, other])
    reference = packed.attention(*(t.float() for t in (q, k, v)), heads, 0.0)
    torch.manual_seed(2)
    mean = sum(packed.attention(q, k, v, heads, p).float() for _ in range(1600)) / 1600
    # bf16 rounding (~1e-2) plus the mean's noise: at most 2.5 standard errors of the 1-token sequence's 0/2v draws
    torch.testing.assert_close(mean, reference, rtol=0, atol=0.1)
