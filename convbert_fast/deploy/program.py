"""The model as it is deployed, and torch.export of it.

Every format takes the same signature: three integer inputs `input_ids`, `attention_mask` (1 attend, 0 padding) and
`token_type_ids`, each [B, L] ([B, num_choices, L] for ConvBertForMultipleChoice), with the batch, sequence (and
choice) dimensions dynamic; and a flat tuple of tensors out, named after the fields of the model's output
(`logits`, `start_logits`, ...), so that a runtime needs no transformers class to unflatten it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import modeling

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = {
    "ConvBertModel": ("last_hidden_state",),
    "ConvBertForMaskedLM": ("logits",),
    "ConvBertForSequenceClassification": ("logits",),
    "ConvBertForMultipleChoice": ("logits",),
    "ConvBertForTokenClassification": ("logits",),
    "ConvBertForQuestionAnswering": ("start_logits", "end_logits"),
}


class DeployedModel(nn.Module):
    """`model` with the deployed signature: (input_ids, attention_mask, token_type_ids) -> a tuple of tensors (the
    outputs of OUTPUT_NAMES: no loss, attentions or hidden states of every layer)."""

    def __init__(self, model: modeling.ConvBertPreTrainedModel):
        super().__init__()
        if type(model).__name__ not in OUTPUT_NAMES or not isinstance(model, modeling.ConvBertPreTrainedModel):
            raise TypeError(
                f"a convbert_fast model is deployed (one of {', '.join(OUTPUT_NAMES)}), got {type(model).__name__}"
            )
        self.model = model
        self.train(model.training)  # the wrapper's own flag, which exporters read, is the model's

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_attentions=False,
            output_hidden_states=False,
            return_dict=False,
        )


def output_names(model) -> tuple[str, ...]:
    return OUTPUT_NAMES[type(model).__name__]


def multiple_choice(model) -> bool:
    return isinstance(model, modeling.ConvBertForMultipleChoice)


def sample_inputs(model, batch_size: int = 2, seq_len: int = 16, num_choices: int = 2, seed: int = 0):
    """(input_ids, attention_mask, token_type_ids) of random tokens: the last sequence padded after half its
    length (masked out), token type 1 on the second half of every sequence where the config has two types."""
    config = model.config
    seq_len = min(seq_len, config.max_position_embeddings)
    shape = (batch_size, num_choices, seq_len) if multiple_choice(model) else (batch_size, seq_len)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(min(5, config.vocab_size - 1), config.vocab_size, shape, generator=generator)
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[-1, ..., math.ceil(seq_len / 2) :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id or 0)
    second_half = torch.arange(seq_len) >= seq_len // 2
    token_type_ids = (second_half & (config.type_vocab_size > 1)).long().expand(shape).contiguous()
    device = next(model.parameters()).device
    return tuple(t.to(device) for t in (input_ids, attention_mask, token_type_ids))


def dynamic_shapes(model) -> dict:
    """Batch and sequence dimensions (and the choices of ConvBertForMultipleChoice) dynamic: the sequence up to
    max_position_embeddings."""
    seq_len = torch.export.Dim("seq_len", max=model.config.max_position_embeddings)
    batch = torch.export.Dim("batch")
    dims = (
        {0: batch, 1: torch.export.Dim("num_choices"), 2: seq_len} if multiple_choice(model) else {0: batch, 1: seq_len}
    )
    return {name: dims for name in INPUT_NAMES}


def check_exportable(model) -> None:
    if model.training:
        raise ValueError(
            "export a model in eval mode (model.eval()): an exported graph runs inference, without dropout"
        )


def export_program(model, sample=None) -> torch.export.ExportedProgram:
    """torch.export of `model` (eval mode) with the deployed signature, under the backend chosen now: with
    `auto` or `cpp`, the graph calls torch.ops.convbert_fast.* (the span conv written after the attention half,
    the separable conv, grouped linear with fused GELU, dropout + residual + LayerNorm) beside one GEMM for Q, K,
    V and conv_out and aten's scaled_dot_product_attention."""
    check_exportable(model)
    sample = sample_inputs(model) if sample is None else sample
    with torch.no_grad():
        return torch.export.export(DeployedModel(model), tuple(sample), dynamic_shapes=dynamic_shapes(model))
