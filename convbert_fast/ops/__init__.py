"""The three hot spots of ConvBERT as functions, each dispatched to the chosen backend."""

from .backend import available_backends, get_backend, set_backend, use_backend
from .dropout_layer_norm import dropout_add_layer_norm
from .grouped_linear import grouped_linear
from .separable_conv import separable_conv1d
from .span_conv import dynamic_span_conv
from . import triton  # noqa: F401  (registers the triton backend, after the op files)

__all__ = [
    "available_backends",
    "dropout_add_layer_norm",
    "dynamic_span_conv",
    "get_backend",
    "grouped_linear",
    "separable_conv1d",
    "set_backend",
    "use_backend",
]
