"""Original ConvBERT TF checkpoints: written here by TensorFlow from random values under the original variable
names, loaded by `cf.load_tf_weights_in_convbert`, every parameter checked against its expected layout."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf  # `./install.sh test` installs tensorflow-cpu
import torch

import convbert_fast as cf
from conftest import make_config

# How a TF array maps to the PyTorch parameter, index by index.
SAME = "same"
DENSE = "io->oi"  # dense kernels are [in, out] in TF, [out, in] in PyTorch
DEPTHWISE = "kcx->cxk"  # separable_conv1d depthwise kernel [K, C, 1] -> nn.Conv1d [C, 1, K]
POINTWISE = "xca->acx"  # pointwise kernel [1, C, A] -> nn.Conv1d [A, C, 1]
COLUMN = "column"  # conv bias [A] -> [A, 1]


def original_variables(config):
    """{TF variable name: (TF shape, PyTorch parameter of ConvBertModel, relation)}, written from the checkpoints."""
    C, E, I, G, K = (
        config.hidden_size,
        config.embedding_size,
        config.intermediate_size,
        config.num_groups,
        config.conv_kernel_size,
    )
    H = max(config.num_attention_heads // config.head_ratio, 1)
    A = H * ((C // H) // 2)
    out = {
        "electra/embeddings/word_embeddings": ((config.vocab_size, E), "embeddings.word_embeddings.weight", SAME),
        "electra/embeddings/position_embeddings": (
            (config.max_position_embeddings, E),
            "embeddings.position_embeddings.weight",
            SAME,
        ),
        "electra/embeddings/token_type_embeddings": (
            (config.type_vocab_size, E),
            "embeddings.token_type_embeddings.weight",
            SAME,
        ),
        "electra/embeddings/LayerNorm/gamma": ((E,), "embeddings.LayerNorm.weight", SAME),
        "electra/embeddings/LayerNorm/beta": ((E,), "embeddings.LayerNorm.bias", SAME),
    }
    if E != C:
        out["electra/embeddings_project/kernel"] = ((E, C), "embeddings_project.weight", DENSE)
        out["electra/embeddings_project/bias"] = ((C,), "embeddings_project.bias", SAME)
    g = "g_dense" if G > 1 else "dense"
    ffn_in = ((G, C // G, I // G), SAME) if G > 1 else ((C, I), DENSE)
    ffn_out = ((G, I // G, C // G), SAME) if G > 1 else ((I, C), DENSE)
    for j in range(config.num_hidden_layers):
        tf_prefix, pt_prefix = f"electra/encoder/layer_{j}/", f"encoder.layer.{j}."
        for tf_name, shape, pt_name, relation in [
            ("attention/self/query/kernel", (C, A), "attention.self.query.weight", DENSE),
            ("attention/self/query/bias", (A,), "attention.self.query.bias", SAME),
            ("attention/self/key/kernel", (C, A), "attention.self.key.weight", DENSE),
            ("attention/self/key/bias", (A,), "attention.self.key.bias", SAME),
            ("attention/self/value/kernel", (C, A), "attention.self.value.weight", DENSE),
            ("attention/self/value/bias", (A,), "attention.self.value.bias", SAME),
            (
                "attention/self/conv_attn_key/depthwise_kernel",
                (K, C, 1),
                "attention.self.key_conv_attn_layer.depthwise.weight",
                DEPTHWISE,
            ),
            (
                "attention/self/conv_attn_key/pointwise_kernel",
                (1, C, A),
                "attention.self.key_conv_attn_layer.pointwise.weight",
                POINTWISE,
            ),
            ("attention/self/conv_attn_key/bias", (A,), "attention.self.key_conv_attn_layer.bias", COLUMN),
            ("attention/self/conv_attn_kernel/kernel", (A, H * K), "attention.self.conv_kernel_layer.weight", DENSE),
            ("attention/self/conv_attn_kernel/bias", (H * K,), "attention.self.conv_kernel_layer.bias", SAME),
            ("attention/self/conv_attn_point/kernel", (C, A), "attention.self.conv_out_layer.weight", DENSE),
            ("attention/self/conv_attn_point/bias", (A,), "attention.self.conv_out_layer.bias", SAME),
            ("attention/output/dense/kernel", (2 * A, C), "attention.output.dense.weight", DENSE),
            ("attention/output/dense/bias", (C,), "attention.output.dense.bias", SAME),
            ("attention/output/LayerNorm/gamma", (C,), "attention.output.LayerNorm.weight", SAME),
            ("attention/output/LayerNorm/beta", (C,), "attention.output.LayerNorm.bias", SAME),
            (f"intermediate/{g}/kernel", ffn_in[0], "intermediate.dense.weight", ffn_in[1]),
            (f"intermediate/{g}/bias", (I,), "intermediate.dense.bias", SAME),
            (f"output/{g}/kernel", ffn_out[0], "output.dense.weight", ffn_out[1]),
            (f"output/{g}/bias", (C,), "output.dense.bias", SAME),
            ("output/LayerNorm/gamma", (C,), "output.LayerNorm.weight", SAME),
            ("output/LayerNorm/beta", (C,), "output.LayerNorm.bias", SAME),
        ]:
            out[tf_prefix + tf_name] = (shape, pt_prefix + pt_name, relation)
    return out


def mlm_head_variables(config):
    C, E = config.hidden_size, config.embedding_size
    return {
        "generator_predictions/dense/kernel": ((C, E), "generator_predictions.dense.weight", DENSE),
        "generator_predictions/dense/bias": ((E,), "generator_predictions.dense.bias", SAME),
        "generator_predictions/LayerNorm/gamma": ((E,), "generator_predictions.LayerNorm.weight", SAME),
        "generator_predictions/LayerNorm/beta": ((E,), "generator_predictions.LayerNorm.bias", SAME),
        "generator_predictions/output_bias": ((config.vocab_size,), "generator_lm_head.bias", SAME),
    }


def write_checkpoint(path, variables, seed=0):
    """Random float32 arrays under `variables`' names, saved by TensorFlow's own checkpoint writer."""
    rng = np.random.default_rng(seed)
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, *_) in variables.items()}
    names = sorted(arrays)
    tf.raw_ops.SaveV2(
        prefix=str(path), tensor_names=names, shape_and_slices=[""] * len(names), tensors=[arrays[n] for n in names]
    )
    return arrays


def expected_parameter(array, relation):
    if relation == SAME:
        return torch.from_numpy(array)
    if relation == COLUMN:
        return torch.from_numpy(array)[:, None]
    return torch.from_numpy(np.einsum(relation, array).copy())


@pytest.mark.parametrize("config_name", ["medium-small", "small-k5", "one-head"])
def test_every_parameter_is_loaded_in_the_expected_layout(config_name, tmp_path):
    config = make_config(config_name)  # medium-small: num_groups 2 and embedding != hidden; one-head: equal
    variables = original_variables(config)
    arrays = write_checkpoint(tmp_path / "model.ckpt", variables)
    model = cf.ConvBertModel(config)
    assert cf.load_tf_weights_in_convbert(model, config, str(tmp_path / "model.ckpt")) is model
    params = dict(model.named_parameters())
    assert set(params) == {pt for _, pt, _ in variables.values()}  # the checkpoint covers the whole model
    for tf_name, (_, pt_name, relation) in variables.items():
        assert torch.equal(params[pt_name].detach(), expected_parameter(arrays[tf_name], relation)), tf_name
    model.eval()(torch.randint(1, 99, (1, 8)))  # and it runs


def test_masked_lm_loads_encoder_and_head(tmp_path):
    config = make_config("small")
    variables = {**original_variables(config), **mlm_head_variables(config)}
    arrays = write_checkpoint(tmp_path / "model.ckpt", variables)
    model = cf.ConvBertForMaskedLM(config)
    cf.load_tf_weights_in_convbert(model, config, str(tmp_path / "model.ckpt"))
    params = dict(model.named_parameters())
    for tf_name, (_, pt_name, relation) in variables.items():
        name = pt_name if pt_name.startswith("generator") else "convbert." + pt_name
        assert torch.equal(params[name].detach(), expected_parameter(arrays[tf_name], relation)), tf_name
    # the output projection stays tied to the (loaded) word embeddings
    assert torch.equal(model.generator_lm_head.weight, torch.from_numpy(arrays["electra/embeddings/word_embeddings"]))


def test_classification_head_is_left_initialised_with_a_warning(tmp_path, caplog):
    config = make_config("small", num_labels=3)
    arrays = write_checkpoint(tmp_path / "model.ckpt", original_variables(config))
    model = cf.ConvBertForSequenceClassification(config)
    head_before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="convbert_fast.tf_checkpoint"):
        cf.load_tf_weights_in_convbert(model, config, str(tmp_path / "model.ckpt"))
    assert "classifier.out_proj.weight" in caplog.text
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, head_before[k])
    assert torch.equal(
        model.convbert.embeddings.LayerNorm.weight.detach(),
        torch.from_numpy(arrays["electra/embeddings/LayerNorm/gamma"]),
    )


def test_missing_variable_is_named_and_nothing_is_copied(tmp_path):
    config = make_config("medium-small")
    variables = original_variables(config)
    del variables["electra/encoder/layer_1/attention/self/conv_attn_key/pointwise_kernel"]
    write_checkpoint(tmp_path / "model.ckpt", variables)
    model = cf.ConvBertModel(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match="no variable 'electra/encoder/layer_1/attention/self/conv_attn_key/pointwise_kernel'"
    ):
        cf.load_tf_weights_in_convbert(model, config, str(tmp_path / "model.ckpt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wrong_shape_names_both_shapes(tmp_path):
    config = make_config("medium-small")
    variables = original_variables(config)
    name = "electra/encoder/layer_0/intermediate/g_dense/kernel"
    variables[name] = ((2, 192, 700), *variables[name][1:])
    write_checkpoint(tmp_path / "model.ckpt", variables)
    with pytest.raises(ValueError, match=r"g_dense/kernel' has shape \[2, 192, 700\].*has shape \[2, 192, 768\]"):
        cf.load_tf_weights_in_convbert(cf.ConvBertModel(config), config, str(tmp_path / "model.ckpt"))
