"""convbert_fast: a faithful ConvBERT whose hot spots run on hand-written kernels."""

from transformers import ConvBertConfig

from . import ops
from .modeling import (
    ConvBertForMaskedLM,
    ConvBertForMultipleChoice,
    ConvBertForQuestionAnswering,
    ConvBertForSequenceClassification,
    ConvBertForTokenClassification,
    ConvBertModel,
    ConvBertPreTrainedModel,
    enable_checkpointing,
)
from .ops import available_backends, get_backend, set_backend, use_backend
from .patch import patch, unpatch
from .tf_checkpoint import load_tf_weights_in_convbert

__version__ = "0.1.0"

__all__ = [
    "ConvBertConfig",
    "ConvBertForMaskedLM",
    "ConvBertForMultipleChoice",
    "ConvBertForQuestionAnswering",
    "ConvBertForSequenceClassification",
    "ConvBertForTokenClassification",
    "ConvBertModel",
    "ConvBertPreTrainedModel",
    "available_backends",
    "enable_checkpointing",
    "get_backend",
    "load_tf_weights_in_convbert",
    "ops",
    "patch",
    "set_backend",
    "unpatch",
    "use_backend",
]
