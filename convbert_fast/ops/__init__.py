"""ConvBERT's three hot spots and its fused dropout + residual + LayerNorm as functions, each dispatched to the chosen
backend (and `dropout` alone with the fused op's mask, in that op's files). One file per op, under the op's name, in
every layer: ops/<op>.py (checks, eager math, the one wrapper every backend registers), ops/triton/<op>.py,
csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu, tests/test_<op>.py."""

from .backend import available_backends, get_backend, set_backend, use_backend
from .dropout_add_layer_norm import dropout, dropout_add_layer_norm
from .dynamic_span_conv import dynamic_span_conv
from .grouped_linear import grouped_linear
from .separable_conv1d import separable_conv1d

__all__ = [
    "available_backends",
    "dropout",
    "dropout_add_layer_norm",
    "dynamic_span_conv",
    "get_backend",
    "grouped_linear",
    "separable_conv1d",
    "set_backend",
    "use_backend",
]
