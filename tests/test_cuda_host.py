"""The CUDA path's host side: the kernel choice read once per op (issue 24, item 1). The cases that need the CUDA
build of convbert_fast._C but no GPU run in CI's GPU-image venv (tools/ci_gpu_image.sh builds it there); those that
run kernels, on a GPU (tools/gpu_check.sh)."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import NO_GPU
from reference import dynamic_span_conv_ref, separable_conv1d_ref

import convbert_fast as cf
from convbert_fast.ops import cpp

CUDA_BUILD = cpp.LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("convbert_fast::dynamic_span_conv", "CUDA")
needs_cuda_build = pytest.mark.skipif(
    not CUDA_BUILD, reason="convbert_fast._C built without CUDA kernels (CI's GPU-image venv builds them)"
)
VARIABLE = cpp.KERNELS_VARIABLE


@needs_cuda_build
def test_kernel_choice_is_handed_over_from_os_environ_and_unknown_values_refused(monkeypatch):
    ops = torch.ops.convbert_fast
    for value, choice in (("v1", "v1"), ("v2", "v2"), ("", "v2"), ("v1", "v1")):
        monkeypatch.setenv(VARIABLE, value)
        cpp.hand_over_kernel_choice()
        assert ops._cuda_kernels() == choice
    monkeypatch.setenv(VARIABLE, "v3")
    with pytest.raises(ValueError, match="CONVBERT_FAST_CUDA_KERNELS must be v1 or v2 \\(or unset: v2\\), got 'v3'"):
        cpp.hand_over_kernel_choice()
    assert ops._cuda_kernels() == "v1"  # the refused value changed nothing
    monkeypatch.delenv(VARIABLE)
    cpp.hand_over_kernel_choice()
    assert ops._cuda_kernels() == "v2"


@NO_GPU
@pytest.mark.timeout(300)
def test_cuda_kernel_choice_flipped_from_another_thread_while_ops_run():
    """v1 and v2 size their workspaces differently (the span conv's softmax weights, LayerNorm's partial sums, the
    depthwise weight gradient's chunks): with the variable flipping between them all the time, every op must still
    allocate for the kernels it launches, and give the right answer."""
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(2, 96, 3 * 64, generator=gen).cuda().requires_grad_()
    logits = torch.randn(2, 96, 3 * 9, generator=gen).cuda().requires_grad_()
    x = torch.randn(2, 96, 256, generator=gen).cuda().requires_grad_()
    weights = [torch.randn(shape, generator=gen).cuda() * 0.3 for shape in ((256, 1, 9), (128, 256, 1), (128,))]
    rows = torch.randn(96, 768, generator=gen).cuda().requires_grad_()
    residual, gamma, beta = (torch.randn(shape, generator=gen).cuda() for shape in ((96, 768), (768,), (768,)))
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            os.environ[VARIABLE] = "v1"
            os.environ[VARIABLE] = "v2"

    previous = os.environ.get(VARIABLE)
    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with cf.use_backend("cpp"):
            for _ in range(20):
                span = cf.ops.dynamic_span_conv(values, logits, 3)
                conv = cf.ops.separable_conv1d(x, *weights)
                norm = cf.ops.dropout_add_layer_norm(rows, residual, gamma, beta, 0.0, 1e-5, True)
                grads = torch.autograd.grad(
                    span.sum() + conv.square().sum() + norm.square().sum(), (values, logits, x, rows)
                )
                torch.cuda.synchronize()
                with torch.no_grad():
                    torch.testing.assert_close(span, dynamic_span_conv_ref(values, logits, 3), rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(conv, separable_conv1d_ref(x, *weights), rtol=1e-4, atol=1e-4)
                    expected = F.layer_norm(rows + residual, (768,), gamma, beta, 1e-5)
                    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=1e-5)
                assert all(torch.isfinite(g).all() for g in grads)
    finally:
        stop.set()
        flipper.join()
        if previous is None:
            os.environ.pop(VARIABLE, None)
        else:
            os.environ[VARIABLE] = previous
