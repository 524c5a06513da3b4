#!/usr/bin/env bash
# CI: tools/triton_aot_check.py (every Triton kernel launch compiled for sm_80 and sm_90, no GPU) on the default
# triton and on the GPU image's triton 3.6.0. The latter lives in its own cached venv (torch 2.13.0 CPU,
# triton 3.6.0, transformers 5.17.0), built on first use. Arguments go to both runs.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${CONVBERT_FAST_TRITON36_VENV:-$HOME/.cache/convbert_fast/venv-triton36}
want="torch==2.13.0 triton==3.6.0 transformers==5.17.0 numpy<2.4"
if ! "$venv/bin/python" -c "import torch, transformers, triton; assert triton.__version__ == '3.6.0'" 2>/dev/null \
    || [ "$(cat "$venv/.convbert_fast_spec" 2>/dev/null)" != "$want" ]; then
    start=$SECONDS
    rm -rf "$venv" && python -m venv "$venv" \
        && "$venv/bin/pip" install -q $want 2>&1 | { grep -v "^WARNING: Location" || true; } \
        && echo "$want" > "$venv/.convbert_fast_spec" || { echo "triton_aot_check.sh: the triton 3.6 venv failed"; exit 1; }
    echo "triton_aot_check.sh: built $venv in $((SECONDS - start)) s"
fi
status=0
for python in python "$venv/bin/python"; do
    start=$SECONDS
    "$python" tools/triton_aot_check.py "$@" || status=1
    echo "triton_aot_check.sh: $("$python" -c 'import triton; print("triton", triton.__version__)') took $((SECONDS - start)) s"
done
exit $status
