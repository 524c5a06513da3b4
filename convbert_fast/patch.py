"""`cf.patch(model)` / `cf.unpatch(model)`: a transformers ConvBERT model runs on convbert_fast's layers, in place.

Every module of the model whose class has a namesake in `convbert_fast.modeling` gets a class derived from both
(ours first in the method resolution order), so our forwards run on the module's own parameters: no copy, the
same state dict, and `isinstance(model, transformers.ConvBertForMaskedLM)` still holds. `unpatch` restores the
original classes. This works because our modules keep transformers' attribute names (the state-dict contract).
"""

from __future__ import annotations

import functools

from torch import nn
from transformers.models.convbert import modeling_convbert as transformers_convbert

from . import inference_weights, modeling, sequences

_ORIGINAL = "_convbert_fast_original_class"
_ADDED = "_convbert_fast_added_attributes"


@functools.cache
def _patched_class(theirs: type) -> type:
    ours = getattr(modeling, theirs.__name__)
    namespace = {"__module__": theirs.__module__, "__qualname__": theirs.__qualname__, "__doc__": theirs.__doc__}
    if "__call__" in vars(transformers_convbert.GradientCheckpointingLayer) and issubclass(
        theirs, transformers_convbert.GradientCheckpointingLayer
    ):
        namespace["__call__"] = nn.Module.__call__  # our encoder does the checkpointing: once, not twice
    return type(theirs.__name__, (ours, theirs), namespace)


def _patchable(module: nn.Module) -> bool:
    cls = type(module)
    return (
        _ORIGINAL not in vars(module)
        and cls.__module__ == transformers_convbert.__name__
        and isinstance(getattr(modeling, cls.__name__, None), type)
    )


def patch(model: nn.Module, *, padding_invariant: bool | None = None) -> nn.Module:
    """Make a transformers ConvBERT model (any of the six classes) use convbert_fast's layers and the selected
    backend's kernels, in place; returns the model. Patching twice is a no-op. `padding_invariant`: True or False
    sets the model config's field of that name (convbert_fast.sequences: every sequence of a padded or packed batch
    gives what it gives alone); None leaves it as it is (transformers' behaviour unless set)."""
    if isinstance(model, modeling.ConvBertPreTrainedModel) and _ORIGINAL not in vars(model):
        raise TypeError(f"{type(model).__name__} is already a convbert_fast model: nothing to patch")
    if not isinstance(model, transformers_convbert.ConvBertPreTrainedModel):
        raise TypeError(
            "cf.patch takes a transformers ConvBERT model (transformers.ConvBertModel, ConvBertForMaskedLM, ...), "
            f"got {type(model).__module__}.{type(model).__name__}"
        )
    for module in model.modules():
        if not _patchable(module):
            continue
        added = []
        if isinstance(module, transformers_convbert.ConvBertIntermediate):  # ours fuses GELU by name
            act = model.config.hidden_act
            module.activation_name = act if isinstance(act, str) else None
            added.append("activation_name")
        vars(module)[_ORIGINAL] = type(module)
        vars(module)[_ADDED] = added
        module.__class__ = _patched_class(type(module))
    if padding_invariant is not None:
        setattr(model.config, sequences.CONFIG_FIELD, bool(padding_invariant))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: the original transformers classes, nothing of ours left on the modules; returns the model."""
    for module in model.modules():
        inference_weights.forget(module, modeling.FUSED_PROJECTION_CACHE)
        original = vars(module).pop(_ORIGINAL, None)
        if original is None:
            continue
        for name in vars(module).pop(_ADDED):
            delattr(module, name)
        module.__class__ = original
    return model
