"""AOTInductor: the exported program compiled ahead of time into one .pt2 package (the weights inside), run from
Python or C++ without transformers or this package.

Our C++ ops stay our kernels: the package calls them by name through AOTInductor's proxy executor, so a deployment
loads the op library first, and needs nothing else of ours:

    torch.ops.load_library(".../convbert_fast/_C.abi3.so")      # C++: dlopen(path, RTLD_LAZY | RTLD_GLOBAL)
    model = torch._inductor.aoti_load_package("model.pt2")      # C++: torch::inductor::AOTIModelPackageLoader
    (logits,) = model(input_ids, attention_mask, token_type_ids)

(examples/aoti_cpp/ is the C++ side.) The proxy executor, not C shims (`aot_inductor.custom_ops_to_c_shims`): a
shim saves at most the cost of a call, measured at 15 us for a whole call of ours on a tiny tensor, on 4 to 6 calls
a layer: 0.1 ms of a 78 ms forward (README, Deploy).
"""

from __future__ import annotations

from pathlib import Path

import torch


def op_library_path() -> str | None:
    """The file of convbert_fast._C, the op library a package with our ops needs at run time (None: not built)."""
    from ..ops import cpp

    return str(Path(cpp._C.__file__).resolve()) if cpp.LOADED else None


def compiler_problem() -> str | None:
    """What AOTInductor lacks here to compile (a working C++ compiler), or None."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return "a C++ compiler, and none works here (AOTInductor compiles C++: install g++ or set CXX)"
    return None


def compile_package(exported: torch.export.ExportedProgram, path) -> str:
    """Compiles `exported` and writes the package to `path` (a .pt2 file)."""
    return torch._inductor.aoti_compile_and_package(exported, package_path=str(path))


def load_package(path):
    """The package at `path` as a callable (tensors in, a list of tensors out), the op library loaded first."""
    library = op_library_path()
    if library is not None:
        torch.ops.load_library(library)  # loaded already by convbert_fast: a no-op then, as a deployment does it
    return torch._inductor.aoti_load_package(str(path))
