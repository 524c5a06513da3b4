#!/usr/bin/env bash
# Builds aoti_run (main.cpp) against the installed torch wheel's own headers and libraries: no separate libtorch.
#   examples/aoti_cpp/build.sh [OUTPUT]      (default: aoti_run beside this script; $PYTHON, $CXX as usual)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/aoti_run}
# the wheel's include folders (one a line), its library folder and the C++ ABI it was built with
mapfile -t torch_paths < <(${PYTHON:-python3} -c '
import torch
from torch.utils import cpp_extension as ext
print(ext.library_paths()[0], int(torch._C._GLIBCXX_USE_CXX11_ABI), *ext.include_paths(), sep="\n")')
lib_dir=${torch_paths[0]} abi=${torch_paths[1]}
includes=("${torch_paths[@]:2}")
# C++20: torch's own headers need it (as torch.utils.cpp_extension builds). --no-as-needed keeps libtorch.so loaded
# although main.cpp calls nothing in it: the package's compiled model needs it, and when that is dlopen'ed later
# the executable's runpath no longer applies (torch 2.11's CUDA build fails there without it).
${CXX:-g++} -std=c++20 -O2 "$here/main.cpp" -o "$out" "${includes[@]/#/-I}" -D_GLIBCXX_USE_CXX11_ABI="$abi" \
    -L"$lib_dir" -Wl,-rpath,"$lib_dir" -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -Wl,--as-needed -ldl
echo "built $out"
