"""The released ConvBERT shapes (YituTech/conv-bert-*), as ConvBertConfig keyword arguments."""

from __future__ import annotations

from transformers import ConvBertConfig

RELEASED_CONFIGS = {
    "base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, embedding_size=768, num_groups=1),
    "medium-small": dict(
        hidden_size=384, num_attention_heads=8, intermediate_size=1536, embedding_size=128, num_groups=2
    ),
    "small": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, embedding_size=128, num_groups=1),
}


def named_config(name: str, **overrides) -> ConvBertConfig:
    """`ConvBertConfig` of a released shape (12 layers, K = 9, head_ratio 2), with `overrides` applied."""
    if name not in RELEASED_CONFIGS:
        raise ValueError(f"unknown config {name!r}; valid: {', '.join(RELEASED_CONFIGS)}")
    return ConvBertConfig(**{**RELEASED_CONFIGS[name], **overrides})
