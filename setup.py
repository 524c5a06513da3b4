"""Builds convbert_fast._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc is found.

Environment:
  CONVBERT_FAST_NO_CUDA=1      build the CPU kernels only
  TORCH_CUDA_ARCH_LIST         GPU architectures (default "8.0;9.0+PTX": cubins for A100 and H100/H200, which sm_86
                               and sm_89 run too, and PTX that newer GPUs compile at load); no GPU is queried
  MAX_JOBS                     parallel compile jobs (default: the cores, capped at one per 3 GiB of memory)
Metadata lives in pyproject.toml.
"""

import glob
import os
import shutil

from setuptools import setup


def find_cuda_home():
    """The CUDA toolkit holding nvcc and its headers, else None. torch takes nvcc's grandparent folder, which is
    wrong when the nvcc on PATH is a wrapper outside the toolkit (/usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc): then the usual install prefixes, newest first."""
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if all(os.path.isfile(os.path.join(home, *f)) for f in (("bin", "nvcc"), ("include", "cuda_runtime.h"))):
            return home
    return None


# Read by torch.utils.cpp_extension when imported, so found first; a CUDA_HOME or CUDA_PATH set by hand wins.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and (toolkit := find_cuda_home()):
    os.environ["CUDA_HOME"] = toolkit

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_build_reason():
    """None when the CUDA kernels will be built, else why not."""
    import torch

    if os.environ.get("CONVBERT_FAST_NO_CUDA", "0") not in ("", "0"):
        return "CONVBERT_FAST_NO_CUDA is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return "nvcc (CUDA_HOME) was not found"
    return None


def memory_capped_jobs():
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(os.cpu_count() or 1, int(memory_gib // 3)))


os.environ.setdefault("MAX_JOBS", str(memory_capped_jobs()))
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

sources = ["csrc/ops.cpp", "csrc/composite.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
# py_limited_api: torch defines Py_LIMITED_API as its own oldest Python (3.10 for torch 2.11 to 2.13)
# -fopenmp: at::parallel_for is a template that runs its loop on torch's OpenMP threads only where the including file
# is compiled with OpenMP; without it every CPU kernel ran on one thread (cpp.cpu_threads() tells). The link flag adds
# libgomp.so.1, the copy torch has already loaded (torch/lib holds it under that name): one pool, torch.set_num_threads
# sizes it.
compile_args = {"cxx": ["-O3", "-fopenmp"]}
link_args = ["-fopenmp"]
skip_reason = cuda_build_reason()
if skip_reason is None:
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    extension = CUDAExtension(
        "convbert_fast._C", sources, extra_compile_args=compile_args, extra_link_args=link_args, py_limited_api=True
    )
    print("convbert_fast: building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST =", os.environ["TORCH_CUDA_ARCH_LIST"])
else:
    extension = CppExtension(
        "convbert_fast._C", sources, extra_compile_args=compile_args, extra_link_args=link_args, py_limited_api=True
    )
    print(f"convbert_fast: building the CPU kernels only ({skip_reason})")

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # requires-python >= 3.10
)
