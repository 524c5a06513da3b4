"""The `onnxruntime` provider of the benchmark: transformers' ConvBertModel exported by torch.onnx (the dynamo
exporter, opset 18) and run by ONNX Runtime on the CPU with every graph optimization and torch's thread count, as a
user who deploys a BERT-class encoder on a CPU would. Inference only: it has no training step.

onnx, onnxscript and onnxruntime are the optional extra `onnx` (`pip install convbert_fast[onnx]`); where one is
missing the provider is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
import weakref

import torch

from .timing import _timer

OPSET = 18
# transformers' model -> {with an attention mask or not: InferenceSession}: one export per model and kind of
# batch, with dynamic batch and length (each export takes seconds); the model's weights at export are those every
# batch starts from (measure_batch restores them after the training steps of each batch)
_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def onnxruntime_problem(device: torch.device, dtype: str = "fp32") -> str | None:
    """Why the provider cannot run here, or None."""
    missing = [name for name in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'convbert_fast[onnx]')"
    if device.type != "cpu":
        return "measured on the CPU only (ONNX Runtime's CUDA provider is another package, onnxruntime-gpu)"
    if dtype != "fp32":
        return f"fp32 only: ONNX Runtime's CPU kernels have no {dtype} GEMMs to compare with torch's autocast"
    return None


@contextlib.contextmanager
def _quiet_export():
    """The exporter's log lines (a warning per torchvision op it cannot register) and deprecation warnings off."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def session(model, masked: bool):
    """An ONNX Runtime session of `model` (transformers' ConvBertModel, fp32, on the CPU) taking input_ids and,
    if `masked`, attention_mask, both [batch, seq_len] int64 of any size up to the position table."""
    import onnxruntime

    sessions = _SESSIONS.setdefault(model, {})
    if masked not in sessions:
        config = model.config
        ids = torch.randint(5, config.vocab_size, (2, 16))
        kwargs = {"attention_mask": torch.ones_like(ids)} if masked else {}
        batch, length = torch.export.Dim("batch"), torch.export.Dim("seq_len", max=config.max_position_embeddings)
        dynamic = {name: {0: batch, 1: length} for name in ("input_ids", *kwargs)}
        training = model.training
        model.train(False)
        try:
            with _quiet_export():
                program = torch.onnx.export(model, (ids,), kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                            dynamic_shapes=dynamic, verbose=False)  # fmt: skip
        finally:
            model.train(training)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        model_bytes = program.model_proto.SerializeToString()
        sessions[masked] = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return sessions[masked]


class OnnxRuntimeRun:
    """ProviderRun's interface for ONNX Runtime: the forward only (`phases`), its output for the comparison with
    transformers', no memory figure (ONNX Runtime allocates outside torch, where the profiler does not look)."""

    provider, phases, compiled = "onnxruntime", ("forward",), False

    def __init__(self, model, batch, device):
        ids, mask, self.tokens = batch
        self.session = session(model, mask is not None)
        names = [i.name for i in self.session.get_inputs()]
        self.feeds = {names[0]: ids.cpu().numpy(), **({names[1]: mask.cpu().numpy()} if mask is not None else {})}
        self.mask = mask
        self.times: dict[str, list[float]] = {"forward": [], "train_step": []}
        self.measure = _timer(device)
        self.max_abs_diff = None

    def forward(self):
        return self.session.run(None, self.feeds)[0]

    def output(self) -> torch.Tensor:
        return torch.from_numpy(self.forward()).float()

    def time(self, phase: str, record: bool = True) -> None:
        ms = self.measure(getattr(self, phase))
        if record:
            self.times[phase].append(ms)

    def measure_memory(self, others) -> None:
        pass

    def result(self, seq_len, batch_size, gemm_flops, train_flops):
        from .providers import Measurement
        from .timing import summary_of

        result = Measurement(self.provider, seq_len, batch_size, padded=self.mask is not None, tokens=self.tokens)
        result.inference_only = True
        result.forward_ms, result.forward_ms_quantiles = summary_of(self.times["forward"])
        result.inference_tokens_per_s = self.tokens / (result.forward_ms / 1e3)
        return result
