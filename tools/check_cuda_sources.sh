#!/usr/bin/env bash
# Compiles the CUDA sources on a machine with neither a GPU nor a CUDA build of torch, so they cannot rot
# unseen: every .cu with nvcc alone (CMake target convbert_fast_cuda_kernels, warnings as errors), and the
# torch glue (csrc/cuda/*.cpp) with g++ -fsyntax-only against torch's headers and CUDA's runtime headers.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
    echo "check_cuda_sources: nvcc not found; nothing checked" >&2
    exit 1
fi
cmake -S . -B build/nvcc-check -DCONVBERT_FAST_KERNELS_ONLY=ON >/dev/null
cmake --build build/nvcc-check -j "$(nproc)"

cuda_include=$(dirname "$(dirname "$(command -v nvcc)")")/include
[ -f "$cuda_include/cuda_runtime_api.h" ] || cuda_include=/usr/local/cuda/include
torch_include=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
python_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
shim=build/nvcc-check/shim
# A CPU build of torch ships c10's CUDA headers but not the one its CMake generates; its content is this line.
mkdir -p "$shim/c10/cuda/impl"
echo "#define C10_CUDA_BUILD_SHARED_LIBS" > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
for source in csrc/cuda/*.cpp; do
    g++ -std=c++20 -fsyntax-only -Wall -Werror -DWITH_CUDA -I"$shim" -I"$torch_include" \
        -I"$torch_include/torch/csrc/api/include" -I"$cuda_include" -I"$python_include" "$source"
    echo "g++ -fsyntax-only: $source ok"
done
