#!/usr/bin/env bash
# Rehearses the GPU image on a CPU machine, as a new user of it would (issue 13), so that a GPU window is not
# spent on what a CPU finds:
#   1. a venv of the image's versions (tools/gpu_image_requirements.txt: torch 2.11.0, a CUDA 13 build, triton
#      3.6.0, transformers 5.17.0) on Python 3.12, cached under ~/.cache/convbert_fast/ and keyed by that file
#      and the Python, so the default suite keeps its CPU torch;
#   2. pyproject.toml's metadata under the setuptools that a fresh venv of each claimed Python brings;
#   3. the CUDA extension built and linked against that torch for sm_80 and sm_90 (and PTX), the way tools/gpu_check.sh
#      builds it (pip install --no-build-isolation --no-deps -e .), then tools/check_cuda_build.py: it loads, and
#      every op has a CUDA kernel registered and a cubin per architecture;
#   4. the test suite in that venv, on the CPU (tests/test_tf_checkpoint.py aside: the image has no tensorflow);
#   5. tools/gpu_check.sh's GPU pass (test,bench, then sanitize) rehearsed in that venv: its steps on the CPU with
#      tiny shapes, so that every command line, test selection and record of it has run before a GPU's minutes.
# The work happens in a copy of the tree (tracked and untracked files), so the checkout's own build is untouched.
# Prints each part's time.
#   tools/ci_gpu_image.sh [PYTEST_ARGS...]    (default: tests)
#   tools/ci_gpu_image.sh --build-only DIR    parts 1 and 3 only, then DIR/_C.abi3.so: the extension for the GPU
#                                             machine, to carry there (tools/gpu_check.sh says how)
# Environment: GPU_IMAGE_PYTHON, an interpreter to use instead of Python 3.12.
set -euo pipefail
build_only=""
if [ "${1:-}" = --build-only ]; then
    build_only=$(mkdir -p "${2:?usage: tools/ci_gpu_image.sh --build-only DIR}" && cd "$2" && pwd)
fi
cd "$(dirname "$0")/.."
root=$PWD
requirements=$root/tools/gpu_image_requirements.txt
arches="8.0;9.0+PTX"  # setup.py's default

timed() {  # timed NAME COMMAND...: run it, then print how long it took
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "ci_gpu_image: $name took $((SECONDS - start)) s"
}

runs() { [ -n "$1" ] && "$1" -c "" 2>/dev/null; }  # pyenv's shims exist for versions they will not run

pick_python() {  # the image's Python 3.12, else 3.11 (said so)
    local candidate
    for candidate in "${GPU_IMAGE_PYTHON:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if runs "$candidate"; then echo "$candidate"; return; fi
    done
    echo "ci_gpu_image: no Python 3.12 here: the GPU image's versions are rehearsed on Python 3.11" >&2
    for candidate in python3.11 "$HOME"/.pyenv/versions/3.11*/bin/python3.11; do
        if runs "$candidate"; then echo "$candidate"; return; fi
    done
    echo "ci_gpu_image: no Python 3.11 either" >&2
    exit 1
}

make_venv() {  # the cached venv of the image's versions; a half-made one (no .complete) is made again
    if [ -f "$venv/.complete" ]; then
        echo "ci_gpu_image: reusing $venv"
        return
    fi
    echo "ci_gpu_image: making $venv (torch 2.11.0 with its CUDA libraries: several GB to download)"
    rm -rf "$(dirname "$venv")"/gpu-image-*  # this one half-made, or others of older requirements (5 GB each)
    "$base_python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q -r "$requirements"
    touch "$venv/.complete"
}

check_metadata() {  # pyproject.toml under the setuptools a fresh venv of each claimed Python brings
    local version python wheel
    for version in 3.10 3.11; do  # Python 3.12's venvs bring no setuptools: the build below runs 66.1 there
        python=""
        for candidate in "python$version" "$HOME"/.pyenv/versions/"$version".*/bin/python"$version"; do
            if runs "$candidate"; then python=$candidate; break; fi
        done
        if [ -z "$python" ]; then
            echo "ci_gpu_image: no Python $version here: its setuptools not checked"
            continue
        fi
        # ensurepip's wheel is what `python -m venv` installs; imported from the wheel, without site-packages
        wheel=$("$python" -c "import ensurepip, glob, os
print(glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), '_bundled', 'setuptools-*.whl'))[0])")
        PYTHONPATH=$wheel "$python" -S -c "
import setuptools, sys, warnings
from setuptools.config.pyprojecttoml import read_configuration
warnings.filterwarnings('ignore', message='Support for .*is still .beta')  # [tool.setuptools]
read_configuration('pyproject.toml')  # validated, as pip install does before building
print(f'ci_gpu_image: pyproject.toml valid under Python {sys.version.split()[0]} and', setuptools.__file__.split('/')[-3])"
    done
}

base_python=$(pick_python)
key=$( (cat "$requirements"; "$base_python" -c "import sys; print(sys.version)") | sha256sum | cut -c1-16)
venv=${XDG_CACHE_HOME:-$HOME/.cache}/convbert_fast/gpu-image-$key
timed "the venv" make_venv
python=$venv/bin/python
export PATH="$venv/bin:$PATH"  # its ninja for the build
"$python" -c "import sys, torch, triton, transformers, numpy, setuptools
print('ci_gpu_image: python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| triton', triton.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__,
      '| setuptools', setuptools.__version__)"
[ -n "$build_only" ] || timed "the metadata check" check_metadata

work=$(mktemp -d)
# the venv stays as it was made: the editable install of this copy goes with the copy
trap 'cd /; "$python" -m pip uninstall -q -y convbert_fast >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work"
cd "$work"
timed "the CUDA build (sm_80, sm_90, compute_90 PTX)" env TORCH_CUDA_ARCH_LIST="$arches" \
    "$python" -m pip install -q --no-build-isolation --no-deps -e .
timed "the CUDA registration check" "$python" tools/check_cuda_build.py --arch "$arches"
if [ -n "$build_only" ]; then
    cp convbert_fast/_C.abi3.so "$build_only/"
    # the sources it was built from, as tools/gpu_check.sh hashes them before it uses the file
    find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16 >"$build_only/sources.sha256"
    echo "ci_gpu_image: wrote $build_only/_C.abi3.so ($(du -h "$build_only/_C.abi3.so" | cut -f1)): carry it to the GPU machine"
    exit 0
fi
# The image has no tensorflow, which tests/test_tf_checkpoint.py needs (the default suite runs it).
timed "the suite on the GPU image's versions" "$python" -m pytest -q -p no:cacheprovider \
    --ignore=tests/test_tf_checkpoint.py "${@:-tests}"
# the GPU pass as a lent machine runs it, its GPU steps on the CPU; two workers for this machine's cores
rehearsal=$work/.gpu-rehearsal
for phases in test,bench sanitize; do
    if ! timed "the GPU pass rehearsed: $phases" env PYTHON="$python" GPU_CHECK_REHEARSE=1 GPU_CHECK_WORKERS=2 \
        tools/gpu_check.sh "$phases" "$rehearsal"; then
        echo "ci_gpu_image: the rehearsal of gpu_check.sh $phases failed: its summary is above" >&2
        exit 1
    fi
done
