"""The model family against transformers' own ConvBERT classes: weights loaded strictly from a transformers model,
fp32, every output and every gradient. The eager backend is the seed's math in transformers' order of operations,
so its outputs and gradients are bit-identical (compared with torch.equal); the fused backends differ at rounding
level."""

from __future__ import annotations

import pytest
import torch
import transformers

import convbert_fast as cf
from conftest import PARITY_CONFIGS, TRITON_ON_CPU, make_config, record_parity

ATOL = 1e-5  # the bound for fp32 parity
CLASSES = [
    "ConvBertModel",
    "ConvBertForMaskedLM",
    "ConvBertForSequenceClassification",
    "ConvBertForMultipleChoice",
    "ConvBertForTokenClassification",
    "ConvBertForQuestionAnswering",
]
BATCH, SEQ_LEN, NUM_CHOICES = 2, 16, 3


def model_pair(class_name, config, train=False):
    """A transformers model and ours holding exactly its weights (strict load)."""
    theirs = getattr(transformers, class_name)(config)
    ours = getattr(cf, class_name)(config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.train(train), ours.train(train)
    return theirs, ours


def make_inputs(class_name, config, gen, labels=True):
    shape = (BATCH, NUM_CHOICES, SEQ_LEN) if class_name == "ConvBertForMultipleChoice" else (BATCH, SEQ_LEN)
    input_ids = torch.randint(1, config.vocab_size, shape, generator=gen)
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[..., 0, SEQ_LEN - 5 :] = 0  # the first sequence (of each choice) is padded
    input_ids[attention_mask == 0] = config.pad_token_id
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=(torch.arange(SEQ_LEN) >= SEQ_LEN // 2).long().expand(shape).contiguous(),
    )
    if labels:
        n = config.num_labels
        if class_name == "ConvBertForMaskedLM":
            target = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN), generator=gen)
            target[:, ::3] = -100
            inputs["labels"] = target
        elif class_name == "ConvBertForSequenceClassification":
            inputs["labels"] = torch.randint(0, n, (BATCH,), generator=gen)
        elif class_name == "ConvBertForMultipleChoice":
            inputs["labels"] = torch.randint(0, NUM_CHOICES, (BATCH,), generator=gen)
        elif class_name == "ConvBertForTokenClassification":
            inputs["labels"] = torch.randint(0, n, (BATCH, SEQ_LEN), generator=gen)
        elif class_name == "ConvBertForQuestionAnswering":
            inputs["start_positions"] = torch.tensor([3, SEQ_LEN + 4])  # the second is past the end: ignored
            inputs["end_positions"] = torch.tensor([7, 2])
    return inputs


def max_diff(a, b, where=""):
    """Largest |a - b| over matching tensors, nested tuples or ModelOutputs; their structures must agree."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        return (a.detach() - b.detach()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, transformers.utils.ModelOutput):
        assert list(a.keys()) == list(b.keys()), f"{where}: fields {list(a.keys())} != {list(b.keys())}"
        return max(max_diff(a[k], b[k], f"{where}.{k}") for k in a.keys())
    assert isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b), f"{where}: {type(a)} vs {type(b)}"
    return max((max_diff(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))), default=0.0)


def assert_parity(label, ours, theirs, exact=False):
    """Within ATOL of transformers; `exact` (the eager backend): bit for bit."""
    diff = max_diff(ours, theirs, label)
    record_parity(label, diff)
    assert diff <= (0.0 if exact else ATOL), f"{label}: max |ours - transformers| = {diff:.3e}"


BACKENDS = ["eager", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    with cf.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("config_name", list(PARITY_CONFIGS))
@pytest.mark.parametrize("class_name", CLASSES)
def test_outputs_match_transformers(class_name, config_name, backend_name):
    config = make_config(config_name, num_labels=3 if class_name != "ConvBertForQuestionAnswering" else 2)
    label = f"{class_name} [{backend_name}]"
    torch.manual_seed(0)
    theirs, ours = model_pair(class_name, config)
    inputs = make_inputs(class_name, config, torch.Generator().manual_seed(1))
    if class_name == "ConvBertModel":
        inputs.pop("labels", None)
    flags = dict(output_attentions=True, output_hidden_states=True)
    exact = backend_name == "eager"  # transformers' math in transformers' order: bit for bit
    with torch.no_grad():
        expected = theirs(**inputs, **flags)
        assert_parity(label, ours(**inputs, **flags), expected, exact=exact)
        if class_name != "ConvBertModel":
            assert expected.loss is not None
        # return_dict=False: the same values as a tuple
        assert_parity(label, ours(**inputs, **flags, return_dict=False), theirs(**inputs, **flags, return_dict=False),
                      exact=exact)  # fmt: skip
        # defaults: no attentions or hidden states
        assert_parity(label, ours(**inputs), theirs(**inputs), exact=exact)


@pytest.mark.parametrize("class_name", CLASSES)
def test_inputs_embeds_match_transformers(class_name):
    config = make_config("medium-small", num_labels=2)
    torch.manual_seed(0)
    theirs, ours = model_pair(class_name, config)
    inputs = make_inputs(class_name, config, torch.Generator().manual_seed(2), labels=False)
    embeds = theirs.get_input_embeddings()(inputs.pop("input_ids")).detach()
    with torch.no_grad():
        expected = theirs(inputs_embeds=embeds, **inputs, output_hidden_states=True)
        assert_parity(class_name, ours(inputs_embeds=embeds, **inputs, output_hidden_states=True), expected)


@pytest.mark.parametrize("problem_type,num_labels", [("regression", 1), ("multi_label_classification", 3)])
def test_sequence_classification_losses(problem_type, num_labels):
    config = make_config("small", num_labels=num_labels)
    theirs, ours = model_pair("ConvBertForSequenceClassification", config)
    inputs = make_inputs("ConvBertModel", config, torch.Generator().manual_seed(3), labels=False)
    gen = torch.Generator().manual_seed(4)
    labels = (
        torch.rand(BATCH, generator=gen) if num_labels == 1 else (torch.rand(BATCH, 3, generator=gen) > 0.5).float()
    )
    with torch.no_grad():
        expected = theirs(**inputs, labels=labels)
        got = ours(**inputs, labels=labels)
    assert ours.config.problem_type == problem_type
    assert_parity("ConvBertForSequenceClassification", got, expected)


@pytest.mark.parametrize("config_name", ["base", "medium-small", "one-head", "small-k3"])
@pytest.mark.parametrize("class_name", CLASSES)
def test_gradients_match_transformers(class_name, config_name, backend_name):
    """Train mode with dropout 0: the loss and the gradient of every parameter."""
    config = make_config(config_name, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(0)
    theirs, ours = model_pair(class_name, config, train=True)
    inputs = make_inputs(class_name, config, torch.Generator().manual_seed(5))
    if class_name == "ConvBertModel":
        inputs.pop("labels", None)
        loss_of = lambda out: out.last_hidden_state.square().mean()  # noqa: E731
    else:
        loss_of = lambda out: out.loss  # noqa: E731
    their_loss, our_loss = loss_of(theirs(**inputs)), loss_of(ours(**inputs))
    their_loss.backward()
    our_loss.backward()
    their_grads = dict(theirs.named_parameters())
    worst = max_diff(our_loss, their_loss, "loss")
    for name, param in ours.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        worst = max(worst, max_diff(param.grad, their_grads[name].grad, name))
    record_parity(f"{class_name} [{backend_name}] (gradients)", worst)
    assert worst <= (0.0 if backend_name == "eager" else ATOL), f"max |ours - transformers| = {worst:.3e}"


def test_chunked_feed_forward_matches_transformers(backend_name):
    """config.chunk_size_feed_forward > 0: the feed-forward runs chunk by chunk over the sequence (transformers'
    apply_chunking_to_forward), in outputs and gradients; 0 (every other test) calls it once on the whole."""
    config = make_config("small", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, chunk_size_feed_forward=4)
    torch.manual_seed(0)
    theirs, ours = model_pair("ConvBertModel", config, train=True)
    inputs = make_inputs("ConvBertModel", config, torch.Generator().manual_seed(2), labels=False)
    exact = backend_name == "eager"
    their_out, our_out = theirs(**inputs).last_hidden_state, ours(**inputs).last_hidden_state
    assert_parity(f"chunked feed-forward [{backend_name}]", our_out, their_out, exact=exact)
    their_out.square().mean().backward()
    our_out.square().mean().backward()
    their_grads = dict(theirs.named_parameters())
    worst = max(max_diff(p.grad, their_grads[name].grad, name) for name, p in ours.named_parameters())
    assert worst <= (0.0 if exact else ATOL), f"max |gradient - transformers'| = {worst:.3e}"
    layer = ours.encoder.layer[0]
    chunks = []
    hook = layer.output.register_forward_hook(lambda module, args, out: chunks.append(out.shape[1]))
    with torch.no_grad():
        ours(**inputs)
    hook.remove()
    assert chunks == [4] * (SEQ_LEN // 4), chunks  # it did run in chunks of 4 positions


@pytest.mark.parametrize("config_name", ["base", "medium-small"])
def test_eager_training_step_with_dropout_is_transformers_bit_for_bit(config_name):
    """Dropout on, the same seed: the eager backend draws transformers' masks in transformers' order, so the loss and
    every gradient are equal, not merely close (the fused layers' dropout is a hash of its own, see the README)."""
    config = make_config(config_name, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    theirs, ours = model_pair("ConvBertForMaskedLM", config, train=True)
    inputs = make_inputs("ConvBertForMaskedLM", config, torch.Generator().manual_seed(10))
    torch.manual_seed(11)
    their_loss = theirs(**inputs).loss
    torch.manual_seed(11)
    with cf.use_backend("eager"):
        our_loss = ours(**inputs).loss
    torch.manual_seed(12)
    dropped = theirs(**inputs).loss
    assert not torch.equal(dropped, their_loss)  # the masks matter: another seed, another loss
    their_loss.backward()
    our_loss.backward()
    assert torch.equal(our_loss, their_loss)
    their_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.equal(param.grad, their_grads[name].grad), name


@pytest.mark.parametrize("class_name", CLASSES)
def test_initial_weights_match_transformers(class_name):
    """Same seed, same draws: the weight init (normal(0, initializer_range), zero biases, unit LayerNorms)
    and the module order are transformers' own."""
    config = make_config("medium-small", num_labels=2)
    torch.manual_seed(7)
    theirs = getattr(transformers, class_name)(config).state_dict()
    torch.manual_seed(7)
    ours = getattr(cf, class_name)(config).state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("class_name", CLASSES)
def test_from_pretrained_both_ways(class_name, tmp_path):
    config = make_config("medium-small", num_labels=2)
    theirs = getattr(transformers, class_name)(config).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours, info = getattr(cf, class_name).from_pretrained(tmp_path / "theirs", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    inputs = make_inputs(class_name, config, torch.Generator().manual_seed(6), labels=False)
    with torch.no_grad():
        assert_parity(class_name, ours.eval()(**inputs), theirs(**inputs))

    ours.save_pretrained(tmp_path / "ours")
    back, info = getattr(transformers, class_name).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    if class_name == "ConvBertForMaskedLM":
        assert ours.generator_lm_head.weight is ours.convbert.embeddings.word_embeddings.weight


def test_cross_attention_decoder_matches_transformers():
    config = make_config("small", is_decoder=True, add_cross_attention=True)
    theirs, ours = model_pair("ConvBertModel", config)
    gen = torch.Generator().manual_seed(8)
    inputs = make_inputs("ConvBertModel", config, gen, labels=False)
    # transformers 5 reshapes keys with the decoder's length, so it only runs when the lengths agree;
    # tests/test_model.py checks other encoder lengths against the reference math.
    encoder_states = torch.randn(BATCH, SEQ_LEN, config.hidden_size, generator=gen)
    encoder_mask = torch.ones(BATCH, SEQ_LEN)
    encoder_mask[1, 7:] = 0
    # transformers 5 adds an encoder mask as given: hand it the additive form ours builds from 0/1.
    additive = (1.0 - encoder_mask[:, None, None, :]) * torch.finfo(torch.float32).min
    with torch.no_grad():
        expected = theirs(**inputs, encoder_hidden_states=encoder_states, encoder_attention_mask=additive)
        got = ours(**inputs, encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask)
        assert_parity("ConvBertModel (cross-attention)", got, expected)
        unmasked = ours(**inputs, encoder_hidden_states=encoder_states)
    assert (unmasked.last_hidden_state - got.last_hidden_state).abs().max() > 1e-3  # the encoder mask matters
    # cross-attention probabilities are reported beside the self-attention ones
    out = ours(**inputs, encoder_hidden_states=encoder_states, output_attentions=True)
    assert out.cross_attentions[0].shape == (BATCH, 2, SEQ_LEN, SEQ_LEN)


@TRITON_ON_CPU
@pytest.mark.timeout(300)  # the Triton interpreter runs a masked-LM model forward and backward: 20 s loaded
def test_triton_backend_matches_transformers():
    """The model through the Triton kernels (Triton's interpreter without a GPU: a small config), forward and
    every parameter's gradient, with the separable conv's query multiply and the grouped GELU fused."""
    config = make_config("one-head", num_groups=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    theirs, ours = model_pair("ConvBertForMaskedLM", config, train=True)
    inputs = make_inputs("ConvBertForMaskedLM", config, torch.Generator().manual_seed(9))
    expected = theirs(**inputs)
    with cf.use_backend("triton"):
        got = ours(**inputs)
    assert_parity("ConvBertForMaskedLM [triton]", got, expected)
    expected.loss.backward()
    got.loss.backward()
    their_grads = dict(theirs.named_parameters())
    worst = max(max_diff(p.grad, their_grads[name].grad, name) for name, p in ours.named_parameters())
    record_parity("ConvBertForMaskedLM [triton] (gradients)", worst)
    assert worst <= ATOL
