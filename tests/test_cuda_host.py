"""The CUDA path's host side (issue 24): the kernel choice read once per op (item 1); `auto` where _C has no code for
the GPU (item 2). The cases that need the CUDA build of convbert_fast._C but no GPU run in CI's GPU-image venv
(tools/ci_gpu_image.sh builds it there); those that run kernels, on a GPU (tools/gpu_check.sh)."""

from __future__ import annotations

import os
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import NO_GPU
from reference import dynamic_span_conv_ref, separable_conv1d_ref

import convbert_fast as cf
from convbert_fast.ops import backend, cpp

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
    with pytest.raises(ValueError, match="CONVBERT_FAST_CUDA_KERNELS must be v1, v2 or tiled \\(or unset: v2\\), got 'v3'"):
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


# What _C says on a GPU it holds no code for (an sm_75 card: older than its arch list), here simulated by the cpp
# backend's preflight, which on a GPU asks _C (cpp.missing_image).
NO_IMAGE = (
    "convbert_fast._C holds no code for Simulated T4 (compute capability 7.5: no kernel image is available for "
    "execution on the device); it was built for TORCH_CUDA_ARCH_LIST (setup.py's default: 8.0;9.0+PTX): rebuild "
    "it with TORCH_CUDA_ARCH_LIST=7.5"
)


def test_auto_falls_back_once_with_the_reason_where_the_extension_has_no_code_for_the_gpu(device_name, monkeypatch):
    """`auto` takes the next backend of its order (Triton, then eager, on CUDA; eager on the CPU) with one warning
    naming the reason, and gives the right answer; an explicit `cpp` raises the reason."""
    monkeypatch.setitem(backend._preflights, "cpp", lambda device: NO_IMAGE if device.type == device_name else None)
    monkeypatch.setattr(backend, "_warned_fallback", set())
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 12, 16, generator=gen).to(device_name)
    logits = torch.randn(2, 12, 2 * 5, generator=gen).to(device_name)
    expected = dynamic_span_conv_ref(values.double(), logits.double(), 2).to(values.dtype)
    with pytest.warns(RuntimeWarning, match="backend 'cpp' cannot run on .*compute capability 7.5") as caught:
        out = cf.ops.dynamic_span_conv(values, logits, 2)
    assert len([w for w in caught if "cannot run" in str(w.message)]) == 1
    torch.testing.assert_close(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device: the second call is silent
        torch.testing.assert_close(cf.ops.dynamic_span_conv(values, logits, 2), expected)
    with cf.use_backend("cpp"), pytest.raises(RuntimeError, match="backend 'cpp' cannot run on .*rebuild it with"):
        cf.ops.dynamic_span_conv(values, logits, 2)


@NO_GPU
@needs_cuda_build
def test_the_cuda_kernels_have_code_for_this_gpu():
    """The real probe, on the GPU pass's GPU: cubins for sm_80/sm_90 or PTX its driver compiles."""
    assert cpp.missing_image(torch.cuda.current_device()) is None


# --- CUDA graphs and the dropout seed (item 3) -----------------------------------------------------------------


def norm_inputs(device, rows=64, channels=768):
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(shape, generator=gen).to(device) for shape in ((rows, channels),) * 2 + ((channels,),) * 2]


def test_compiled_dropout_draws_a_new_seed_at_each_call():
    """The seed is drawn inside the graph (by the input device's generator): a compiled function draws a new one at
    each call, as a replayed CUDA graph does on a GPU (below), instead of baking in the one it was traced with."""
    x, residual, weight, bias = norm_inputs("cpu", rows=8, channels=64)
    with cf.use_backend("cpp"):
        torch._dynamo.reset()
        compiled = torch.compile(lambda a: cf.ops.dropout_add_layer_norm(a, residual, weight, bias, 0.5, 1e-5, True))
        outs = [compiled(x) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def dropped_where_the_gradient_is_zero(out, grad_x, x, residual, weight, bias, p):
    """d(x) = d(h) * mask / (1 - p) is zero exactly where dropped (d(h) is not, almost surely): the mask it shows
    must be the one the forward used."""
    keep = grad_x != 0
    expected = F.layer_norm(torch.where(keep, x / (1 - p), 0) + residual, (x.shape[-1],), weight, bias, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    return keep


@NO_GPU
def test_cuda_graph_replays_draw_new_dropout_masks():
    """Captured with torch.cuda.graph, forward and backward: each replay draws a new seed on the GPU (the CUDA
    generator is capture-safe), so the masks differ between replays, and each replay's backward regenerates its
    forward's mask."""
    x, residual, weight, bias = norm_inputs("cuda")
    x.requires_grad_()
    grad = torch.randn_like(x)

    def step():
        out = cf.ops.dropout_add_layer_norm(x, residual, weight, bias, 0.5, 1e-5, True)
        return out, torch.autograd.grad(out, x, grad)[0]

    with cf.use_backend("cpp"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph's docs ask
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, grad_x = step()
        masks = []
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            masks.append(
                dropped_where_the_gradient_is_zero(out, grad_x, x.detach(), residual, weight, bias, 0.5).clone()
            )
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@NO_GPU
@pytest.mark.timeout(300)
def test_cuda_reduce_overhead_compile_draws_new_dropout_masks():
    """torch.compile(mode="reduce-overhead") records CUDA graphs and replays them: the masks still differ per call."""
    x, residual, weight, bias = norm_inputs("cuda")
    with cf.use_backend("cpp"):
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda a: cf.ops.dropout_add_layer_norm(a, residual, weight, bias, 0.5, 1e-5, True), mode="reduce-overhead"
        )
        outs = [compiled(x).clone() for _ in range(4)]  # warm-up, recording, then replays
    assert all(not torch.equal(a, b) for a, b in zip(outs, outs[1:]))
