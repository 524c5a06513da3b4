"""The benchmark's deploy providers: inference only (a forward; no training step or memory row), each an artifact
of convbert_fast.deploy (what `python -m convbert_fast export` writes), built once per run from the model the other
providers share and checked against a copy of that model on every batch before it is timed.

- `aoti`: the AOTInductor package of ours (backend auto: our C++ ops through the proxy executor), from Python;
- `onnxruntime-ours`: ONNX Runtime on our ONNX graph (our ops as standard ONNX ops, opset 23);
- `onnxruntime-transformers`: ONNX Runtime on transformers' ConvBertModel exported by torch.onnx (dynamo, opset 18,
  its own translations): the baseline a user deploying a BERT-class encoder on a CPU weighs us against.

Each takes the deployed signature's three inputs (a mask of ones and token types of zero where the batch has none);
ONNX Runtime runs with every graph optimization and torch's thread count (deploy/ort.py).
"""

from __future__ import annotations

import copy
import tempfile
import weakref
from pathlib import Path

import torch

DEPLOY_PROVIDERS = {
    "aoti": "AOTInductor package of convbert_fast (inference only)",
    "onnxruntime-ours": "ONNX Runtime on convbert_fast's ONNX graph, our ops as standard ONNX ops (inference only)",
    "onnxruntime-transformers": "ONNX Runtime on transformers' model exported by torch.onnx, opset 18 (inference only)",
}
TRANSFORMERS_OPSET = 18  # torch.onnx's default translations of transformers' graph, as optimum exports ConvBERT


def deploy_problem(provider: str, device: torch.device, autocast_dtype) -> str | None:
    """Why deploy provider `provider` cannot run here, or None (None for every other provider)."""
    if provider not in DEPLOY_PROVIDERS:
        return None
    if device.type != "cpu":
        return "deploy providers are measured on the CPU (ONNX Runtime's CPU provider; an AOTInductor CPU package)"
    if autocast_dtype is not None:
        return "deploy artifacts are exported in fp32"
    from ..deploy import format_problem

    return format_problem("aoti" if provider == "aoti" else "onnx")


class Artifact:
    """One provider's artifact, its runner, and the model it was made from with the deployed signature (a copy in
    eval mode, kept apart from the shared model, whose weights the training steps of other providers move)."""

    def __init__(self, provider: str, model, folder: Path):
        from .. import deploy
        from ..deploy import program

        model = copy.deepcopy(model).eval()
        # the default mode, whatever the shared model's config holds now (the cpp-unpadded provider turns its
        # padding-invariant mode on and off call by call): an export fixes the mode it was traced in
        model.config.padding_invariant = False
        if provider == "aoti":
            path = folder / "model.pt2"
            deploy.export(model, "aoti", path)
            self.run, self.tolerance = deploy.load("aoti", path), deploy.TOLERANCE["aoti"]
        else:
            from ..deploy import onnx_ops

            path = folder / "model.onnx"
            if provider == "onnxruntime-ours":
                onnx_ops.export_onnx(model, path)
            else:
                export_transformers_onnx(model, path)
            self.run, self.tolerance = deploy.load("onnx", path), deploy.TOLERANCE["onnx"]
        ours = provider != "onnxruntime-transformers"
        self.reference = program.DeployedModel(model) if ours else TransformersSignature(model)

    def check(self, provider, inputs) -> None:
        """Raises unless the artifact's output is its model's on `inputs` within the format's bound."""
        with torch.no_grad():
            got, expected = self.run(*inputs)[0], self.reference(*inputs)[0]
        diff = (got - expected).abs().max().item()
        if not diff <= self.tolerance:
            raise AssertionError(
                f"{provider}: the artifact differs from its model by {diff:.2e} (> {self.tolerance:g})"
            )


def export_transformers_onnx(model, path) -> None:
    """transformers' ConvBertModel as torch.onnx writes it with its own translations (no table of ours)."""
    from ..deploy import program

    inputs = program.sample_inputs(model)
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            TransformersSignature(model), inputs, dynamo=True, opset_version=TRANSFORMERS_OPSET, verbose=False,
            dynamic_shapes=program.dynamic_shapes(model), input_names=list(program.INPUT_NAMES),
            output_names=["last_hidden_state"],
        )  # fmt: skip
    onnx_program.save(str(path))


class TransformersSignature(torch.nn.Module):
    """transformers' model with the deployed signature (deploy.program.DeployedModel takes only ours)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return (self.model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0],)


# model -> {provider: its artifact}; weak, so that a model built by a later run in this process gets its own
_artifacts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_folder = None


def runner(provider: str, models, batch):
    """A callable that runs `provider`'s artifact (built at the first call for it in this process) on `batch`,
    checked against the artifact's model first."""
    global _folder
    theirs, ours = models
    model = theirs if provider == "onnxruntime-transformers" else ours
    built = _artifacts.setdefault(model, {})
    if provider not in built:
        _folder = _folder or tempfile.TemporaryDirectory(prefix="convbert_fast_bench_")
        built[provider] = Artifact(provider, model, Path(tempfile.mkdtemp(dir=_folder.name, prefix=provider)))
    artifact = built[provider]
    ids, mask, _ = batch
    inputs = (ids, torch.ones_like(ids) if mask is None else mask, torch.zeros_like(ids))
    artifact.check(provider, inputs)
    return lambda: artifact.run(*inputs)
