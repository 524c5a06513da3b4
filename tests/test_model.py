"""What transformers cannot check for us: head_mask (dropped in transformers 5) and cross-attention with another
encoder length against the reference math, gradient checkpointing, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

import convbert_fast as cf
from conftest import make_config
from convbert_fast.modeling import extended_attention_mask
from reference import self_attention_ref


def eval_model(config_name="small", cls=cf.ConvBertModel, **overrides):
    torch.manual_seed(0)
    return cls(make_config(config_name, **overrides)).eval()


def padded_batch(config, batch=2, seq_len=12, gen=None):
    input_ids = torch.randint(1, config.vocab_size, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len)
    mask[0, seq_len - 4 :] = 0
    return input_ids, mask


@pytest.mark.parametrize("config_name", ["small", "medium-small", "one-head", "small-k5"])
def test_self_attention_matches_reference_math(config_name, rng):
    layer = eval_model(config_name).encoder.layer[0].attention.self
    x = torch.randn(2, 12, layer.query.in_features, generator=rng)
    mask = torch.ones(2, 12)
    mask[1, 9:] = 0
    additive = extended_attention_mask(mask, x.dtype)
    head_mask = (torch.rand(layer.num_attention_heads, generator=rng) > 0.5).float()
    with torch.no_grad():
        context, probs = layer(x, additive, head_mask.reshape(1, -1, 1, 1), output_attentions=True)
        ref_context, ref_probs = self_attention_ref(layer, x, additive, head_mask)
    torch.testing.assert_close(context, ref_context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)


def test_cross_attention_with_another_encoder_length_matches_reference(rng):
    model = eval_model("small", is_decoder=True, add_cross_attention=True)
    cross = model.encoder.layer[0].crossattention.self
    x = torch.randn(2, 12, 256, generator=rng)
    encoder_states = torch.randn(2, 7, 256, generator=rng)
    with torch.no_grad():
        context, probs = cross(x, None, None, encoder_states, output_attentions=True)
        ref_context, ref_probs = self_attention_ref(cross, x, encoder_states=encoder_states)
    assert probs.shape == (2, 2, 12, 7)
    torch.testing.assert_close(context, ref_context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, ref_probs)
    # and the whole decoder runs with it
    ids, mask = padded_batch(model.config, gen=rng)
    out = model(ids, mask, encoder_hidden_states=encoder_states, encoder_attention_mask=torch.ones(2, 7))
    assert out.last_hidden_state.shape == (2, 12, 256)


def test_head_mask_per_layer_matches_layer_by_layer_math(rng):
    """head_mask [layers, H] reaches layer i as head_mask[i] (a [1, H, 1, 1] multiplier on the probabilities)."""
    model = eval_model("small")
    ids, mask = padded_batch(model.config, gen=rng)
    head_mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        out = model(ids, mask, head_mask=head_mask, output_attentions=True)
        hidden = model.embeddings(ids)
        hidden = model.embeddings_project(hidden)
        additive = extended_attention_mask(mask, hidden.dtype)
        for i, layer in enumerate(model.encoder.layer):
            context, probs = self_attention_ref(layer.attention.self, hidden, additive, head_mask[i])
            torch.testing.assert_close(out.attentions[i], probs, rtol=1e-5, atol=1e-6)
            assert out.attentions[i][:, head_mask[i] == 0].abs().max() == 0  # masked heads: zero probabilities
            attention_output = layer.attention.output(context, hidden)
            hidden = layer.output(layer.intermediate(attention_output), attention_output)
    torch.testing.assert_close(out.last_hidden_state, hidden, rtol=1e-5, atol=1e-5)


def test_head_mask_of_ones_and_flat_head_mask(rng):
    model = eval_model("small")
    ids, mask = padded_batch(model.config, gen=rng)
    with torch.no_grad():
        plain = model(ids, mask).last_hidden_state
        ones = model(ids, mask, head_mask=torch.ones(2)).last_hidden_state
        flat = model(ids, mask, head_mask=torch.tensor([0.0, 1.0])).last_hidden_state
        per_layer = model(ids, mask, head_mask=torch.tensor([[0.0, 1.0], [0.0, 1.0]])).last_hidden_state
    # a head mask takes the explicit softmax path, no mask the fused one (scaled_dot_product_attention):
    # the same math summed in another order, so fp32 rounding (~1e-7 relative per op) apart
    torch.testing.assert_close(ones, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat, per_layer, rtol=0, atol=0)
    assert (flat - plain).abs().max() > 1e-3
    with cf.use_backend("eager"), torch.no_grad():  # the seed's math: multiplying by ones changes nothing
        torch.testing.assert_close(
            model(ids, mask, head_mask=torch.ones(2)).last_hidden_state,
            model(ids, mask).last_hidden_state,
            rtol=0,
            atol=0,
        )


def test_head_mask_of_wrong_shape_is_refused(rng):
    model = eval_model("small")
    ids, _ = padded_batch(model.config, gen=rng)
    with pytest.raises(ValueError, match=r"head_mask must have shape \[2\] or \[2, 2\]"):
        model(ids, head_mask=torch.ones(3))


@pytest.mark.parametrize("cls", [cf.ConvBertForMaskedLM, cf.ConvBertForQuestionAnswering])
def test_gradient_checkpointing_recomputes_and_keeps_gradients(cls, rng, monkeypatch):
    config = make_config("medium-small", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    plain = cls(config).train()
    checkpointed = cls(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    cf.enable_checkpointing(checkpointed)
    ids, mask = padded_batch(config, gen=rng)
    if cls is cf.ConvBertForMaskedLM:
        labels = dict(labels=ids)
    else:
        labels = dict(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4]))
    plain(ids, mask, **labels).loss.backward()
    calls = []
    span_conv = cf.ops.dynamic_span_conv
    monkeypatch.setattr(cf.ops, "dynamic_span_conv", lambda *args, **kw: calls.append(1) or span_conv(*args, **kw))
    checkpointed(ids, mask, **labels).loss.backward()
    assert len(calls) == 2 * config.num_hidden_layers  # each layer ran again in the backward pass
    grads = dict(plain.named_parameters())
    for name, param in checkpointed.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=0, atol=0, msg=name)


def test_input_ids_and_inputs_embeds_exactly_one(rng):
    model = eval_model("small")
    ids, _ = padded_batch(model.config, gen=rng)
    with pytest.raises(ValueError, match="cannot specify both input_ids and inputs_embeds"):
        model(ids, inputs_embeds=torch.randn(2, 12, 128))
    with pytest.raises(ValueError, match="specify either input_ids or inputs_embeds"):
        model()


def test_sequence_longer_than_the_position_table_is_refused(rng):
    model = eval_model("small")  # max_position_embeddings = 64
    model(torch.randint(1, 99, (1, 64), generator=rng))  # the limit itself is fine
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_position_embeddings = 64"):
        model(torch.randint(1, 99, (1, 65), generator=rng))


@pytest.mark.parametrize("kernel_size", [0, 2, 8])
def test_even_or_zero_kernel_size_is_refused_at_build(kernel_size):
    with pytest.raises(ValueError, match=f"conv_kernel_size must be odd and positive.*got {kernel_size}"):
        cf.ConvBertModel(make_config("small", conv_kernel_size=kernel_size))


def test_groups_must_divide_the_feed_forward():
    with pytest.raises(ValueError, match=r"num_groups \(3\) must divide"):
        cf.ConvBertModel(make_config("medium-small", num_groups=3, intermediate_size=1000))


def test_forward_under_bf16_autocast_is_close_to_fp32(rng):
    """A smoke check of autocast through all three ops: bf16 error is bounded by transformers' own."""
    import transformers

    config = make_config("medium-small")
    torch.manual_seed(0)
    theirs = transformers.ConvBertModel(config).eval()
    ours = cf.ConvBertModel(config).eval()
    ours.load_state_dict(theirs.state_dict())
    ids, mask = padded_batch(config, gen=rng)
    with torch.no_grad():
        oracle = theirs(ids, mask).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs_bf16 = theirs(ids, mask).last_hidden_state
            ours_bf16 = ours(ids, mask).last_hidden_state
    their_error = (theirs_bf16.float() - oracle).abs().max()
    our_error = (ours_bf16.float() - oracle).abs().max()
    assert our_error <= 2 * their_error + 1e-6
