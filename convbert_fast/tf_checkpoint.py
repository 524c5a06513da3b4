"""Loading the original ConvBERT TensorFlow checkpoints (ELECTRA-style variable names under `electra/`)."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def tf_variable_names(config) -> dict[str, str]:
    """Base-model parameter name -> TF variable name, for every parameter of a ConvBertModel with `config`."""
    names = {
        "embeddings.word_embeddings.weight": "electra/embeddings/word_embeddings",
        "embeddings.position_embeddings.weight": "electra/embeddings/position_embeddings",
        "embeddings.token_type_embeddings.weight": "electra/embeddings/token_type_embeddings",
        "embeddings.LayerNorm.weight": "electra/embeddings/LayerNorm/gamma",
        "embeddings.LayerNorm.bias": "electra/embeddings/LayerNorm/beta",
        "embeddings_project.weight": "electra/embeddings_project/kernel",
        "embeddings_project.bias": "electra/embeddings_project/bias",
    }
    ffn_dense = "g_dense" if config.num_groups > 1 else "dense"
    per_layer = {
        "attention.self.query.weight": "attention/self/query/kernel",
        "attention.self.query.bias": "attention/self/query/bias",
        "attention.self.key.weight": "attention/self/key/kernel",
        "attention.self.key.bias": "attention/self/key/bias",
        "attention.self.value.weight": "attention/self/value/kernel",
        "attention.self.value.bias": "attention/self/value/bias",
        "attention.self.key_conv_attn_layer.depthwise.weight": "attention/self/conv_attn_key/depthwise_kernel",
        "attention.self.key_conv_attn_layer.pointwise.weight": "attention/self/conv_attn_key/pointwise_kernel",
        "attention.self.key_conv_attn_layer.bias": "attention/self/conv_attn_key/bias",
        "attention.self.conv_kernel_layer.weight": "attention/self/conv_attn_kernel/kernel",
        "attention.self.conv_kernel_layer.bias": "attention/self/conv_attn_kernel/bias",
        "attention.self.conv_out_layer.weight": "attention/self/conv_attn_point/kernel",
        "attention.self.conv_out_layer.bias": "attention/self/conv_attn_point/bias",
        "attention.output.dense.weight": "attention/output/dense/kernel",
        "attention.output.dense.bias": "attention/output/dense/bias",
        "attention.output.LayerNorm.weight": "attention/output/LayerNorm/gamma",
        "attention.output.LayerNorm.bias": "attention/output/LayerNorm/beta",
        "intermediate.dense.weight": f"intermediate/{ffn_dense}/kernel",
        "intermediate.dense.bias": f"intermediate/{ffn_dense}/bias",
        "output.dense.weight": f"output/{ffn_dense}/kernel",
        "output.dense.bias": f"output/{ffn_dense}/bias",
        "output.LayerNorm.weight": "output/LayerNorm/gamma",
        "output.LayerNorm.bias": "output/LayerNorm/beta",
    }
    for i in range(config.num_hidden_layers):
        for pt, tf in per_layer.items():
            names[f"encoder.layer.{i}.{pt}"] = f"electra/encoder/layer_{i}/{tf}"
    return names


# The masked-LM head, stored by ELECTRA-style pretraining code beside the encoder (loaded when present).
MASKED_LM_HEAD_NAMES = {
    "generator_predictions.dense.weight": "generator_predictions/dense/kernel",
    "generator_predictions.dense.bias": "generator_predictions/dense/bias",
    "generator_predictions.LayerNorm.weight": "generator_predictions/LayerNorm/gamma",
    "generator_predictions.LayerNorm.bias": "generator_predictions/LayerNorm/beta",
    "generator_lm_head.bias": "generator_predictions/output_bias",
}


def tf_to_torch_layout(tf_name: str, value: torch.Tensor) -> torch.Tensor:
    """TF stores dense kernels [in, out], separable-conv kernels [K, C, 1] and [1, C, A], the conv bias [A]."""
    if tf_name.endswith("/kernel") and "/g_dense/" not in tf_name:  # grouped kernels are [G, in/G, out/G] in both
        return value.T
    if tf_name.endswith("/depthwise_kernel"):
        return value.permute(1, 2, 0)  # [K, C, 1] -> [C, 1, K]
    if tf_name.endswith("/pointwise_kernel"):
        return value.permute(2, 1, 0)  # [1, C, A] -> [A, C, 1]
    if tf_name.endswith("/conv_attn_key/bias"):
        return value.unsqueeze(-1)  # [A] -> [A, 1]
    return value


def load_tf_weights_in_convbert(model, config, tf_checkpoint_path):
    """Copy the weights of an original ConvBERT TF checkpoint into `model` (any convbert_fast ConvBERT class).

    Every encoder parameter must be in the checkpoint with the right shape, else a ValueError names the
    variable (and both shapes); nothing is copied unless all are found. Head parameters that pretraining
    checkpoints do not hold (classification heads) keep their initial values, with a warning naming them.
    """
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError("Loading a TensorFlow checkpoint needs TensorFlow: `pip install tensorflow-cpu`") from e
    tf_path = os.path.abspath(tf_checkpoint_path)
    reader = tf.train.load_checkpoint(tf_path)
    tf_shapes = reader.get_variable_to_shape_map()

    base = model.base_model
    prefix = "" if base is model else model.base_model_prefix + "."
    required = {prefix + pt: tf for pt, tf in tf_variable_names(config).items()}
    optional = MASKED_LM_HEAD_NAMES if prefix else {}

    values, left_initialised = {}, []
    for name, param in model.named_parameters():  # tied parameters appear once
        tf_name = required.get(name) or optional.get(name)
        if tf_name is None or (name in optional and tf_name not in tf_shapes):
            left_initialised.append(name)
            continue
        if tf_name not in tf_shapes:
            raise ValueError(f"TF checkpoint {tf_path} has no variable {tf_name!r} (needed for parameter {name})")
        value = tf_to_torch_layout(tf_name, torch.from_numpy(reader.get_tensor(tf_name)))
        if value.shape != param.shape:
            raise ValueError(
                f"TF variable {tf_name!r} has shape {list(tf_shapes[tf_name])} (as {list(value.shape)} in PyTorch "
                f"layout), but parameter {name} has shape {list(param.shape)}"
            )
        values[name] = value
        logger.info("TF %s -> PT %s", tf_name, name)

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
    if left_initialised:
        logger.warning("Not in the TF checkpoint, left as initialised: %s", ", ".join(left_initialised))
    return model
