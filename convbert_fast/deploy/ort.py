"""ONNX Runtime sessions as the deploy check and the benchmark run them (one place for both): every graph
optimization, torch's intra-op thread count (the same threads as the PyTorch providers), CPU execution."""

from __future__ import annotations

import torch


def session(path, threads: int | None = None):
    """An onnxruntime.InferenceSession of the model at `path`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(ort_session, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The session's outputs, in its order, as torch tensors, for CPU tensors named by the model's inputs."""
    feeds = {name: tensor.detach().cpu().numpy() for name, tensor in inputs.items()}
    return tuple(torch.from_numpy(out) for out in ort_session.run(None, feeds))
