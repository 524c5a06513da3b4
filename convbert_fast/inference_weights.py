"""Weights derived once for inference and reused while the parameters do not change: the attention's four
projections stacked for one GEMM (modeling.ConvBertSelfAttention.fused_projection_weights), and on the CPU, fp32
weights packed for MKL's or oneDNN's GEMM, whichever is faster here (`linear`).

A derived weight is kept on its module (a plain attribute: not in the state dict) under a key of its parameters'
storages, version counters and dtypes. torch's fused optimizers (AdamW/Adam/SGD with fused=True, torch 2.13)
update parameters in place without bumping their version counters: a hook on every optimizer step bumps them, as
the for-loop and foreach optimizers' in-place ops do. Writes through `.data` bump nothing: call
`model.load_state_dict(model.state_dict())` after those.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

PACKED = "_packed_weights"  # {name: (key, rows, packed weight or None)} on the module that owns the weight
PACKING_ENV = "CONVBERT_FAST_PACK_WEIGHTS"  # "0": never pack (the memory of a second copy of each GEMM weight)
GEMM_ENV = "CONVBERT_FAST_CPU_GEMM"  # "mkl" or "onednn": that library's packed GEMM for every shape (else measured)
# A packed weight and the GEMM that takes it, per library. MKL's (cblas_sgemm_pack) ran ConvBERT-base's GEMMs
# 10-16% faster than F.linear on a Xeon at 128 rows (oneDNN's was not measured there); on an AMD EPYC (Zen 4, 2
# threads, fp32) oneDNN's reordered weight ran them at 215-220 GFLOP/s against MKL's 150-160 at 128 rows, 221
# against 195 at 1024 rows. Which one serves a shape is measured (`pack`).
PACK = {
    "mkl": lambda weight, rows: torch.ops.mkl._mkl_reorder_linear_weight(weight, rows),
    "onednn": lambda weight, rows: torch.ops.mkldnn._reorder_linear_weight(weight, rows),
}
PACKED_LINEAR = {
    "mkl": lambda x, packed, weight, bias, rows: torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows),
    "onednn": lambda x, packed, weight, bias, rows: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""),
}
_CHOSEN: dict[tuple, str] = {}  # (rows, in features, out features, bias or not) -> the library measured faster


def onednn_gelu(x, packed, bias):
    """F.gelu(F.linear(...)) on oneDNN's packed weight: an exact (erf) GELU applied to the GEMM's output tile while it
    is in cache: 0.25 ms less than F.gelu after it at 128 rows of ConvBERT-base's intermediate layer (768 -> 3072)
    on the AMD EPYC, the same numbers within 1e-6."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], "none")


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


def _libraries_here() -> dict[str, bool]:
    return {"mkl": torch.backends.mkl.is_available(), "onednn": torch.backends.mkldnn.is_available()}


def gemm_libraries() -> list[str]:
    """The libraries whose packed GEMM `linear` may use here: GEMM_ENV's if set, else those this torch has."""
    forced = os.environ.get(GEMM_ENV)
    if forced:
        return [forced]
    return [name for name, available in _libraries_here().items() if available]


def packing_problem() -> str | None:
    """Why `linear` cannot pack weights here, or None."""
    if os.environ.get(PACKING_ENV, "1") == "0":
        return f"{PACKING_ENV}=0"
    forced = os.environ.get(GEMM_ENV)
    if forced and forced not in PACK:
        return f"{GEMM_ENV}={forced!r} is none of {', '.join(PACK)}"
    here = _libraries_here()
    if forced and not here[forced]:
        return f"{GEMM_ENV}={forced}, which this torch lacks"
    if not any(here.values()):
        return "this torch has neither MKL nor oneDNN"
    return None


_PACKING_PROBLEM = packing_problem()


def pack(x, weight, bias, rows) -> tuple[str, torch.Tensor]:
    """(library, `weight` packed by it) for F.linear(x, weight, bias) at `rows` rows: the only library there is,
    else the faster here, measured the first time the shape is packed in this process (each packs and is called
    once, then three rounds of one call each, taking turns; the lower minimum wins)."""
    libraries = gemm_libraries()
    shape = (rows, weight.shape[1], weight.shape[0], bias is not None)
    if len(libraries) == 1:  # GEMM_ENV's, or this torch's only one
        _CHOSEN[shape] = libraries[0]
    if shape in _CHOSEN:
        return _CHOSEN[shape], PACK[_CHOSEN[shape]](weight, rows)
    packs, best = {name: PACK[name](weight, rows) for name in libraries}, dict.fromkeys(libraries, float("inf"))
    for name in libraries:
        PACKED_LINEAR[name](x, packs[name], weight, bias, rows)
    for _ in range(3):
        for name in libraries:
            start = time.perf_counter()
            PACKED_LINEAR[name](x, packs[name], weight, bias, rows)
            best[name] = min(best[name], time.perf_counter() - start)
    _CHOSEN[shape] = min(best, key=best.get)
    return _CHOSEN[shape], packs[_CHOSEN[shape]]


def gemm_choices() -> dict[str, str]:
    """The library each shape packed so far in this process runs on, "rows x in x out" -> name (a bias or not)."""
    return {f"{r}x{k}x{n}" + ("" if has_bias else " no bias"): name for (r, k, n, has_bias), name in _CHOSEN.items()}


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


def linear(owner: torch.nn.Module, name: str, x, weight, bias, params=None, gelu: bool = False):
    """F.linear(x, weight, bias) [..., K] -> [..., N]. For fp32 CPU inference, with `weight` packed once, by MKL
    (cblas_sgemm_pack, as Inductor's freezing pass does; F.linear packs it inside every call: ConvBERT-base's
    GEMMs at 128 rows run 10-16% faster on a Xeon, 9% at 512 rows, 1.5% at 2048) or by oneDNN, whichever
    `pack` finds faster. A pack serves one row count; it is made the second time in a row that `owner`'s
    `name` sees the same rows and weights, so that a run whose shapes change at every call does not pay for packs
    it never reuses. `params`: the parameters `weight` derives from (default: weight and bias themselves). `gelu`:
    F.gelu of the result (exact), fused into oneDNN's GEMM where that serves it."""
    if _PACKING_PROBLEM is not None and _PACKING_PROBLEM.startswith(GEMM_ENV):
        raise ValueError(f"{_PACKING_PROBLEM}: unset it, or set it to one of {', '.join(PACK)}")
    activation = F.gelu if gelu else (lambda y: y)
    if not _packable(x, weight, bias):
        return activation(F.linear(x, weight, bias))
    rows = x.numel() // x.shape[-1]
    key = parameters_key([t for t in (weight, bias) if t is not None] if params is None else params)
    if key is None:
        return activation(F.linear(x, weight, bias))
    packs = owner.__dict__.setdefault(PACKED, {})
    seen = packs.get(name)
    if seen is None or seen[0] != key or seen[1] != rows:
        packs[name] = (key, rows, None)
        return activation(F.linear(x, weight, bias))
    if seen[2] is None:
        packs[name] = (key, rows, pack(x, weight, bias, rows))
    library, packed = packs[name][2]
    if gelu and library == "onednn":
        return onednn_gelu(x, packed, bias)
    return activation(PACKED_LINEAR[library](x, packed, weight, bias, rows))


def layer(module: torch.nn.Linear, x, gelu: bool = False):
    """`module(x)` for an nn.Linear, through `linear` (`gelu`: its F.gelu)."""
    return linear(module, "weight", x, module.weight, module.bias, gelu=gelu)


def forget(module: torch.nn.Module, *names: str) -> None:
    """Drops the weights derived on `module` (`names`: other attributes of such weights)."""
    for attribute in (PACKED, *names):
        vars(module).pop(attribute, None)
