"""Deploying a convbert_fast model (`python -m convbert_fast export`): three formats of one signature (program.py).

- `exported-program`: torch.export's ExportedProgram (torch.export.save), our ops in its graph;
  run time: torch and the op library (`import convbert_fast`, or torch.ops.load_library of convbert_fast/_C).
- `aoti`: an AOTInductor package (aoti.py); run time: libtorch and the op library, from Python or C++.
- `onnx`: ONNX, our ops written as standard ONNX ops (onnx_ops.py); run time: ONNX Runtime alone.

Each is checked against the eager model on a sample batch of another shape than the one exported with (the
dimensions are dynamic): fp32 outputs within TOLERANCE.
"""

from __future__ import annotations

import torch

from . import program

FORMATS = ("exported-program", "aoti", "onnx")
# fp32: the exported program runs our kernels as eager does; inductor reorders the rest of the arithmetic (1e-5,
# the bound of the model's parity with transformers); ONNX Runtime has kernels of its own for every op (1e-4)
TOLERANCE = {"exported-program": 1e-5, "aoti": 1e-5, "onnx": 1e-4}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def format_problem(fmt: str) -> str | None:
    """Why `fmt` cannot be written here (a missing dependency), or None."""
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}"
    if fmt == "onnx":
        missing = []
        for name in ONNX_PACKAGES:
            try:
                __import__(name)
            except ImportError:
                missing.append(name)
        if missing:
            return f"--format onnx needs {', '.join(missing)}: pip install 'convbert_fast[onnx]'"
    if fmt == "aoti":
        from . import aoti

        problem = aoti.compiler_problem()
        if problem:
            return f"--format aoti needs {problem}"
    return None


def calls_our_ops(exported: torch.export.ExportedProgram) -> bool:
    return any(
        node.op == "call_function" and str(node.target).startswith("convbert_fast") for node in exported.graph.nodes
    )


def export(model, fmt: str, path, sample=None):
    """Writes `model` (eval mode) in format `fmt` to `path`; returns the ExportedProgram (exported-program, aoti)
    or torch.onnx.ONNXProgram (onnx)."""
    if fmt == "onnx":
        from .onnx_ops import export_onnx

        return export_onnx(model, path, sample)
    exported = program.export_program(model, sample)
    if fmt == "aoti":
        from . import aoti

        aoti.compile_package(exported, path)
    else:
        torch.export.save(exported, str(path))
    return exported


def load(fmt: str, path):
    """The artifact at `path` as a function of (input_ids, attention_mask, token_type_ids) -> a tuple of tensors."""
    if fmt == "onnx":
        from . import ort

        session = ort.session(path)
        return lambda *inputs: ort.run(session, dict(zip(program.INPUT_NAMES, inputs)))
    if fmt == "aoti":
        from . import aoti

        package = aoti.load_package(path)
        return lambda *inputs: tuple(package(*inputs))
    module = torch.export.load(str(path)).module()
    return lambda *inputs: tuple(module(*inputs))


def max_difference(model, run, sample) -> float:
    """The largest |artifact - eager| over every output on `sample`."""
    with torch.no_grad():
        expected = program.DeployedModel(model)(*sample)
        got = run(*sample)
    if len(got) != len(expected):
        raise AssertionError(f"the artifact gives {len(got)} outputs, the model {len(expected)}")
    return max((g.to(e.device) - e).abs().max().item() for g, e in zip(got, expected))
