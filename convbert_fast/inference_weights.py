"""Weights derived once for inference and reused while the parameters do not change: the attention's four
projections stacked for one GEMM (modeling.ConvBertSelfAttention.fused_projection_weights), and on the CPU, fp32
weights packed for MKL's GEMM (`linear`).

A derived weight is kept on its module (a plain attribute: not in the state dict) under a key of its parameters'
storages, version counters and dtypes. torch's fused optimizers (AdamW/Adam/SGD with fused=True, torch 2.13)
update parameters in place without bumping their version counters: a hook on every optimizer step bumps them, as
the for-loop and foreach optimizers' in-place ops do. Writes through `.data` bump nothing: call
`model.load_state_dict(model.state_dict())` after those.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

PACKED = "_packed_weights"  # {name: (key, rows, packed weight or None)} on the module that owns the weight
PACKING_ENV = "CONVBERT_FAST_PACK_WEIGHTS"  # "0": never pack (the memory of a second copy of each GEMM weight)


def _bump_stepped_versions(optimizer, args, kwargs):
    """After any torch.optim.Optimizer's step: the version counters of the parameters it updated (those with a
    gradient) move on, so that a weight derived from them before the step is not served after it."""
    stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.autograd.graph.increment_version(stepped)


register_optimizer_step_post_hook(_bump_stepped_versions)


def parameters_key(params) -> tuple | None:
    """What a weight derived from `params` depends on, or None where that cannot be known (parameters that are
    inference tensors, made under torch.inference_mode, have no version counter): then nothing is kept. Inference-mode
    tensors cannot be saved for a backward later: what is built in inference mode is kept apart."""
    if any(p.is_inference() for p in params):
        return None
    return (torch.is_inference_mode_enabled(), *((p.data_ptr(), p._version, p.dtype) for p in params))


def packing_problem() -> str | None:
    """Why `linear` cannot pack weights here, or None."""
    if os.environ.get(PACKING_ENV, "1") == "0":
        return f"{PACKING_ENV}=0"
    if not torch.backends.mkl.is_available():
        return "this torch has no MKL (torch.ops.mkl._mkl_linear)"
    return None


_PACKING_PROBLEM = packing_problem()


def _packable(x, weight, bias) -> bool:
    """fp32 on the CPU, no gradient asked for, no autocast (it would run this GEMM in bf16), eager (torch.compile and
    export see F.linear: Inductor packs on its own), plain tensors (not fake or functorch-wrapped)."""
    return (
        _PACKING_PROBLEM is None
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and type(x) is torch.Tensor
        and weight.is_contiguous()
        and x.numel() > 0
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def linear(owner: torch.nn.Module, name: str, x, weight, bias, params=None):
    """F.linear(x, weight, bias) [..., K] -> [..., N]. For fp32 CPU inference, with `weight` packed once by MKL
    (cblas_sgemm_pack, as Inductor's freezing pass does; F.linear packs it inside every call): ConvBERT-base's
    GEMMs at 128 rows run 10-16% faster on a Xeon (9% at 512 rows, 1.5% at 2048). A pack serves one row count; it
    is made the second time in a row that `owner`'s `name` sees the same rows and weights, so that a run whose
    shapes change at every call does not pay for packs it never reuses. `params`: the parameters `weight` derives
    from (default: weight and bias themselves)."""
    if not _packable(x, weight, bias):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    key = parameters_key([t for t in (weight, bias) if t is not None] if params is None else params)
    if key is None:
        return F.linear(x, weight, bias)
    packs = owner.__dict__.setdefault(PACKED, {})
    seen = packs.get(name)
    if seen is None or seen[0] != key or seen[1] != rows:
        packs[name] = (key, rows, None)
        return F.linear(x, weight, bias)
    packed = seen[2]
    if packed is None:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        packs[name] = (key, rows, packed)
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


def layer(module: torch.nn.Linear, x):
    """`module(x)` for an nn.Linear, through `linear`."""
    return linear(module, "weight", x, module.weight, module.bias)


def forget(module: torch.nn.Module, *names: str) -> None:
    """Drops the weights derived on `module` (`names`: other attributes of such weights)."""
    for attribute in (PACKED, *names):
        vars(module).pop(attribute, None)
