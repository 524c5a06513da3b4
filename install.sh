#!/usr/bin/env bash
# Installs convbert_fast into the current Python environment.
#   ./install.sh        the package
#   ./install.sh test   the package and what the tests need (pytest, tensorflow-cpu)
# A torch that is already installed is kept (the build uses it: --no-build-isolation); otherwise
# $TORCH_SPEC is installed first (default torch==2.13.0, the CPU build these machines hold).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "install.sh: using the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
    "$PYTHON" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
# pyproject.toml's build requirements (--no-build-isolation skips them): setuptools 66.1 is the first on Python 3.12
"$PYTHON" -m pip install "setuptools>=64; python_version < '3.12'" "setuptools>=66.1; python_version >= '3.12'" wheel
extras=""
if [ "${1:-}" = "test" ]; then extras="[test]"; fi
"$PYTHON" -m pip install --no-build-isolation -e ".${extras}"
