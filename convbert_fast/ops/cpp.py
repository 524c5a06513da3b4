"""Loads convbert_fast._C, the C++/CUDA extension, whose library registers torch.ops.convbert_fast.*.

The op files register their fake (meta) and autograd rules and the `cpp` backend when LOADED is true.
"""

from __future__ import annotations

import torch

from . import backend

try:
    from .. import _C  # noqa: F401
except ImportError as error:
    LOADED = False
    backend.mark_failed(
        "cpp",
        f"convbert_fast._C did not load ({error}); "
        "build it with `./install.sh` (pip install --no-build-isolation -e .)",
    )
else:
    LOADED = True
    if not torch._C._dispatch_has_kernel_for_dispatch_key("convbert_fast::dynamic_span_conv", "CUDA"):
        backend.mark_device_unsupported(
            "cpp", "cuda", "convbert_fast._C was built without CUDA kernels (setup.py said why when it built)"
        )
