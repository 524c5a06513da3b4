#!/usr/bin/env bash
# One command for a machine with a GPU: build the extension with CUDA, run the whole test suite (CUDA cases
# included), compute-sanitizer memcheck and racecheck over the CUDA op tests, then the op benchmarks.
# Every step's log, the JUnit XML and the benchmark JSON go to OUTDIR; OUTDIR/summary.txt says what ran,
# what failed and what was skipped and why. Sized for one 10-minute call on an H100.
#   tools/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUTDIR/NAME.log, note the outcome
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(($(date +%s) - start))" "$*" | tee -a "$summary"
    [ "$rc" -eq 0 ] || failed=1
    return "$rc"
}
skip() { printf '%-10s SKIPPED  %s\n' "$1" "$2" | tee -a "$summary"; }

{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } >>"$summary" 2>&1 ||
    echo "nvidia-smi failed: no GPU visible?" | tee -a "$summary"
python -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
           '| cuda', torch.version.cuda, '| transformers', transformers.__version__)" >>"$summary" 2>&1

if ! python -c "import transformers, sys; sys.exit(int(transformers.__version__.split('.')[0]) < 5)"; then
    echo "transformers here is older than 5.0, which convbert_fast needs: carry a transformers>=5 wheel" \
        "and install it first (pip install --no-deps WHEEL); stopping before the build" | tee -a "$summary"
    exit 1
fi

# Only this GPU's architecture, to build fast (setup.py defaults to 8.0;9.0).
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
if ! step build 420 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
    python -m pip install --no-build-isolation --no-deps -e .; then
    echo "the build failed: nothing else can run (see $out/build.log)" | tee -a "$summary"
    exit 1
fi
step info 60 python -m convbert_fast info
test_args=(tests -q -p no:cacheprovider --junitxml="$out/tests.xml")
if ! python -c "import tensorflow" 2>/dev/null; then  # GPU images often lack it; the CPU CI runs these tests
    test_args+=(--ignore=tests/test_tf_checkpoint.py)
    skip tf-tests "tensorflow is not installed here: tests/test_tf_checkpoint.py not run"
fi
# one Triton config instead of autotuning every test shape (the benchmarks below autotune)
step tests 300 env CONVBERT_FAST_TRITON_AUTOTUNE=0 python -m pytest "${test_args[@]}"
# the general (v1) CUDA kernels too, while both sets exist (README: two sets of CUDA kernels)
step tests-v1 150 env CONVBERT_FAST_CUDA_KERNELS=v1 CONVBERT_FAST_TRITON_AUTOTUNE=0 \
    python -m pytest tests/test_dynamic_span_conv.py tests/test_separable_conv1d.py \
    tests/test_dropout_add_layer_norm.py -q -p no:cacheprovider -k cuda

sanitized_tests=(tests/test_separable_conv1d.py tests/test_dynamic_span_conv.py tests/test_grouped_linear.py
                 tests/test_dropout_add_layer_norm.py -q -p no:cacheprovider -k "cuda and (matches_reference or strided_slice or nan_spreads or only_some) and not float16")
# PATH may hold only a wrapper nvcc outside the toolkit: then the toolkit's own bin/, as setup.py finds it
for toolkit in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    if ! command -v compute-sanitizer >/dev/null && [ -x "$toolkit/bin/compute-sanitizer" ]; then
        PATH="$PATH:$toolkit/bin"
    fi
done
if command -v compute-sanitizer >/dev/null; then
    export CONVBERT_FAST_TRITON_AUTOTUNE=0
    step memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 99 python -m pytest "${sanitized_tests[@]}"
    step racecheck 180 compute-sanitizer --tool racecheck --error-exitcode 99 \
        python -m pytest tests/test_dynamic_span_conv.py -q -p no:cacheprovider -k "cuda and dynamic_span_conv_matches_reference and float32"
    unset CONVBERT_FAST_TRITON_AUTOTUNE
else
    skip memcheck "compute-sanitizer is not on PATH"
    skip racecheck "compute-sanitizer is not on PATH"
fi
step bench 240 python -m pytest benchmarks -q -p no:cacheprovider --bench-device cuda --benchmark-only \
    --benchmark-group-by=group --benchmark-json="$out/bench_ops.json"
# the model: transformers (eager, compiled) against ours, bf16 autocast, 12 layers, B=32; then the breakdown
step model 300 python -m convbert_fast bench --seq-len 512 --json "$out/bench_model.json" --plot "$out/bench_model.png"
step breakdown 120 python benchmarks/breakdown.py --json "$out/breakdown.json"
echo "done: $([ $failed -eq 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED')" | tee -a "$summary"
exit $failed
