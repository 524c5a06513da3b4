#!/usr/bin/env bash
# The checks that need a GPU, in three phases that each fit one call on a lent GPU machine (under 8 minutes on
# an H100; one call may run 10, the whole lease lasts 15 with start-up), run in order of value:
#
#   tools/gpu_check.sh test     OUTDIR   # info, the CUDA cases of the suite (v2 kernels, then v1), the autotuned
#                                        # Triton configs at base shapes
#   tools/gpu_check.sh sanitize OUTDIR   # compute-sanitizer memcheck (caching allocator off) and racecheck, op tests
#   tools/gpu_check.sh bench    OUTDIR   # the op benchmarks, the model benchmark and the breakdown
#
# Each phase builds convbert_fast._C in place first when it is not built with CUDA kernels (this GPU's arch
# only; budget 150 s), runs every step under `timeout`, and writes at most 6 files: OUTDIR/PHASE-summary.txt
# (what ran, passed, failed and was skipped, and why), OUTDIR/PHASE-logs.tar.gz (every step's log and JUnit
# XML) and, for bench, its four records. The planned budgets of a phase's steps add up to PHASE_CAP (465 s);
# a step never runs past what is left of the phase after the budgets of the steps behind it. Without a GPU
# (a dry run) a phase goes as far as it can and stops at its first GPU-only step, saying so (exit 3).
# The interpreter is ${PYTHON:-python3} (on the GPU image the one that holds torch is python3).
set -uo pipefail
usage="usage: tools/gpu_check.sh test|sanitize|bench OUTDIR"
phase=${1:-}
case "$phase" in test | sanitize | bench) ;; *) echo "$usage" >&2 && exit 2 ;; esac
out=${2:?$usage}
PY=${PYTHON:-python3}
PHASE_CAP=465     # seconds for all steps of a phase; the archive and the summary take a few more (< 480 s)
BUILD_BUDGET=150  # measured on the GPU machine: see the build line of the summary
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
mkdir -p "$out" && out=$(cd "$out" && pwd)
logs=$(mktemp -d)
summary="$out/$phase-summary.txt"
phase_start=$(date +%s)
failures=0
steps_ran=0 steps_passed=0 steps_skipped=0
stopped=""
# the tree's own package first (also for benchmarks/breakdown.py, whose sys.path[0] is benchmarks/), unbuffered
# logs, and no interpreter for Triton: on a GPU its kernels compile for the GPU
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

say() { echo "$*" | tee -a "$summary"; }
left() { echo $((PHASE_CAP - ($(date +%s) - phase_start))); }

finish() {  # always: the counts, then one archive of every log
    local verdict
    if [ -n "$stopped" ]; then
        verdict="STOPPED: $stopped"
    elif [ "$failures" -gt 0 ]; then
        verdict="FAILED"
    else
        verdict="passed"
    fi
    say ""
    say "$phase: $verdict | steps: $steps_ran ran, $steps_passed passed, $failures failed, $steps_skipped skipped" \
        "| $(($(date +%s) - phase_start)) s of the ${PHASE_CAP} s cap | logs: $phase-logs.tar.gz"
    tar -czf "$out/$phase-logs.tar.gz" -C "$logs" . && rm -rf "$logs"
}
trap finish EXIT

skip() {  # skip NAME WHY
    steps_skipped=$((steps_skipped + 1))
    printf '%-14s %-8s %5s %6s  %s\n' "$1" skipped - - "$2" | tee -a "$summary"
}

stop() {  # stop NAME WHY: the first step this machine cannot run; nothing after it runs
    stopped="$1 needs $2"
    printf '%-14s %-8s %5s %6s  %s\n' "$1" STOP - - "$2; the $phase phase stops here" | tee -a "$summary"
    exit 3
}

# step NAME LIMIT COMMAND...: run with a time limit, log to NAME.log, one line in the summary (with the test
# counts when the step wrote NAME.xml). LIMIT comes from `budget` or `rest`.
step() {
    local name=$1 limit=$2 start rc result detail=""
    shift 2
    if [ "$limit" -lt 15 ]; then
        printf '%-14s %-8s %5s %6s  %s\n' "$name" NOTIME - - "no time left in the phase's ${PHASE_CAP} s" | tee -a "$summary"
        failures=$((failures + 1))
        return 1
    fi
    start=$(date +%s)
    # SIGINT first, so that pytest still writes its report and JUnit XML; then SIGKILL 10 s later
    timeout --signal=INT --kill-after=10 $((limit - 10)) "$@" >"$logs/$name.log" 2>&1
    rc=$?
    steps_ran=$((steps_ran + 1))
    case $rc in
        0) result=ok && steps_passed=$((steps_passed + 1)) ;;
        124 | 137) result=TIMEOUT && failures=$((failures + 1)) ;;
        *) result="FAILED" && failures=$((failures + 1)) ;;
    esac
    [ -f "$logs/$name.xml" ] && detail=$(junit_counts "$logs/$name.xml")
    [ -z "$detail" ] && [ $rc -ne 0 ] && detail="rc=$rc; last line: $(tail -n 1 "$logs/$name.log" | cut -c1-150)"
    printf '%-14s %-8s %4ss %5ss  %s\n' "$name" "$result" $(($(date +%s) - start)) "$limit" "$detail" |
        tee -a "$summary"
    [ -f "$logs/$name.xml" ] && junit_details "$logs/$name.xml" | tee -a "$summary"
    return $rc
}
budget() { local later=${2:-0} l; l=$(($(left) - later)); echo $(($1 < l ? $1 : l)); }  # PLANNED [LATER]
rest() { echo $(($(left) - ${1:-0})); }  # everything left but LATER seconds

junit_counts() {
    "$PY" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
suites = ET.parse(sys.argv[1]).getroot()
suites = [suites] if suites.tag == "testsuite" else list(suites)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{n['tests']} tests: {passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
EOF
}

junit_details() {  # the failed tests, and the skipped ones grouped by reason
    "$PY" - "$1" <<'EOF'
import collections, sys, xml.etree.ElementTree as ET
failed, reasons = [], collections.Counter()
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    name = f"{case.get('classname')}::{case.get('name')}"
    for child in case:
        if child.tag in ("failure", "error"):
            failed.append(f"{name}: {(child.get('message') or '').splitlines()[0][:160] if child.get('message') else child.tag}")
        elif child.tag == "skipped":
            reasons[(child.get("message") or "no reason given").splitlines()[0][:160]] += 1
for line in failed[:25]:
    print(f"    failed  {line}")
if len(failed) > 25:
    print(f"    ... and {len(failed) - 25} more failed (see the log)")
for reason, count in reasons.most_common():
    print(f"    skipped {count:>4} x {reason}")
EOF
}

: >"$summary"
say "gpu_check $phase  $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "$(git diff --quiet HEAD 2>/dev/null || echo '(with uncommitted changes)')"
case $phase in
    test) say "plan (s): preflight 90, build $BUILD_BUDGET (if not built), info 90, cuda-tests: the rest but 180, tests-v1 90, autotuned 90" ;;
    sanitize) say "plan (s): preflight 90, build $BUILD_BUDGET (if not built), memcheck: the rest but 110, racecheck 110" ;;
    bench) say "plan (s): preflight 90, build $BUILD_BUDGET (if not built), bench-ops 100, bench-model: the rest but 60, breakdown 60" ;;
esac
printf '%-14s %-8s %5s %6s  %s\n' step result time limit detail | tee -a "$summary"

# --- preflight: the interpreter, its packages, the GPU -----------------------------------------------------------
if ! command -v "$PY" >/dev/null; then
    failures=1
    say "preflight      FAILED   '$PY' is not on PATH (set PYTHON=/path/to/python)"
    exit 1
fi
{ command -v nvidia-smi >/dev/null || echo "not found"; } >"$logs/nvidia-smi.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$logs/nvidia-smi.log" 2>&1
step preflight "$(budget 90)" "$PY" -c "
import sys, torch, transformers
gpu = torch.cuda.is_available()
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| transformers', transformers.__version__, '| GPU:', torch.cuda.get_device_name(0) if gpu else 'none visible to torch')
if int(transformers.__version__.split('.')[0]) < 5:
    sys.exit('transformers here is older than 5.0, which convbert_fast needs: carry a transformers>=5 wheel')
try:
    import convbert_fast._C  # noqa: F401
except Exception as error:
    built = 'missing'
    print('convbert_fast._C does not load:', error)
else:
    built = 'cuda' if torch._C._dispatch_has_kernel_for_dispatch_key('convbert_fast::dynamic_span_conv', 'CUDA') else 'cpu'
print('GPU=%d' % gpu, 'ARCH=%s' % ('%d.%d' % torch.cuda.get_device_capability() if gpu else 'none'), 'BUILT=' + built)
" || exit 1
read -r gpu arch built < <(grep '^GPU=' "$logs/preflight.log" | tail -n 1 | sed 's/[A-Z]*=//g')
say "               $(grep '^python' "$logs/preflight.log")"
say "               nvidia-smi: $(head -n 1 "$logs/nvidia-smi.log")"
no_gpu="a CUDA GPU, and torch here sees none ($(grep -o 'torch [^ ]*' "$logs/preflight.log" | head -n 1), no GPU visible)"

# --- build, when convbert_fast._C is missing or has no CUDA kernels ---------------------------------------------
if [ "$built" = cuda ] || { [ "$built" = cpu ] && [ "$gpu" = 0 ]; }; then
    skip build "convbert_fast._C is built ($built kernels)"
else
    # this GPU's arch only (setup.py's default builds two); MAX_JOBS: setup.py's default (cores, memory-capped)
    arch_list=${TORCH_CUDA_ARCH_LIST:-$arch}
    [ "$arch_list" = none ] && arch_list="8.0;9.0"  # no GPU to ask: setup.py's default
    step build "$(budget $BUILD_BUDGET)" env TORCH_CUDA_ARCH_LIST="$arch_list" "$PY" setup.py build_ext --inplace || { say "the build failed: nothing else can run (build.log)" && exit 1; }
fi

# --- the phases ---------------------------------------------------------------------------------------------------
pytest_base=("$PY" -m pytest -q -rfE -p no:cacheprovider)
if ! "$PY" -c "import tensorflow" 2>/dev/null; then  # GPU images often lack it; CI runs that file on the CPU
    pytest_base+=(--ignore=tests/test_tf_checkpoint.py)
fi

find_sanitizer() {  # PATH, then the CUDA toolkit's bin (and its compute-sanitizer folder)
    local dir nvcc_dir candidates=()
    command -v compute-sanitizer && return 0
    nvcc_dir=$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")
    for dir in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$nvcc_dir/.." \
        "$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null)" \
        /usr/local/cuda /usr/local/cuda-*; do
        [ -n "$dir" ] && candidates+=("$dir/bin/compute-sanitizer" "$dir/compute-sanitizer/compute-sanitizer")
    done
    for dir in "${candidates[@]}"; do
        [ -x "$dir" ] && echo "$dir" && return 0
    done
    return 1
}

case $phase in
test)
    step info "$(budget 90)" "$PY" -m convbert_fast info
    [ "$gpu" = 1 ] || stop cuda-tests "$no_gpu"
    # the CUDA cases of the whole suite (ids with cuda or gpu), one Triton config per kernel (autotuning every
    # test shape would not fit); then the autotuned configs, each checked at ConvBERT-base shapes
    step cuda-tests "$(rest 180)" env CONVBERT_FAST_TRITON_AUTOTUNE=0 \
        "${pytest_base[@]}" tests -k "cuda or gpu" --junitxml="$logs/cuda-tests.xml"
    # the general (v1) CUDA kernels too, while both sets exist (README: two sets of CUDA kernels)
    step tests-v1 "$(budget 90 90)" env CONVBERT_FAST_CUDA_KERNELS=v1 \
        "${pytest_base[@]}" tests/test_dynamic_span_conv.py tests/test_separable_conv1d.py \
        tests/test_dropout_add_layer_norm.py -k "cuda and not triton and not eager" --junitxml="$logs/tests-v1.xml"
    step autotuned "$(budget 90)" env CONVBERT_FAST_TRITON_AUTOTUNE=1 \
        "${pytest_base[@]}" tests -k "autotuned or (full_shapes_on_gpu and triton)" --junitxml="$logs/autotuned.xml"
    ;;
sanitize)
    if sanitizer=$(find_sanitizer); then
        say "               compute-sanitizer: $sanitizer"
    else
        sanitizer=""
    fi
    [ -n "$sanitizer" ] || say "               compute-sanitizer: not found on PATH nor under the CUDA toolkit"
    [ "$gpu" = 1 ] || stop memcheck "$no_gpu"
    [ -n "$sanitizer" ] || stop memcheck "compute-sanitizer, not found on PATH nor under the CUDA toolkit's bin"
    # the step's own limit replaces pytest-timeout's per-test one: everything runs far slower under the sanitizer
    pytest_base+=(-o timeout=0)
    op_tests=(tests/test_separable_conv1d.py tests/test_dynamic_span_conv.py tests/test_grouped_linear.py
              tests/test_dropout_add_layer_norm.py)
    # the cpp and Triton CUDA kernels of all four ops (not eager: torch's own), forward and backward, dropout
    # included, fp32 values and fp64 gradients, and the direct calls the C++ checks refuse; the caching allocator
    # off, so that an access past a tensor's end leaves its cudaMalloc block
    picks="matches_reference and float32 and not multiplier and not prefix or gradients_match_reference"
    picks+=" or strided_slice or nan_spreads or drops_with or direct_calls_check_every_tensor"
    step memcheck "$(rest 110)" env CONVBERT_FAST_TRITON_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$sanitizer" --tool memcheck --error-exitcode 99 --print-limit 20 \
        "${pytest_base[@]}" "${op_tests[@]}" -k "cuda and not eager and ($picks)" --junitxml="$logs/memcheck.xml"
    # the hand-written kernels, whose threads share memory: span conv, depthwise conv, LayerNorm (with dropout)
    step racecheck "$(budget 110)" env CONVBERT_FAST_TRITON_AUTOTUNE=0 \
        "$sanitizer" --tool racecheck --error-exitcode 99 --print-limit 20 \
        "${pytest_base[@]}" "${op_tests[@]}" \
        -k "cuda and not eager and not triton and (matches_reference and float32 and not multiplier and not prefix or gradients_match_reference or drops_with)" \
        --junitxml="$logs/racecheck.xml"
    ;;
bench)
    [ "$gpu" = 1 ] || stop bench-ops "$no_gpu"
    step bench-ops "$(budget 100 120)" "${pytest_base[@]}" benchmarks --bench-device cuda --benchmark-only \
        --benchmark-group-by=group --benchmark-json="$out/bench_ops.json"
    # the model: transformers (eager, compiled) against ours, bf16 autocast, 12 layers, B=32, L=512
    step bench-model "$(rest 60)" "$PY" -m convbert_fast bench --seq-len 512 --json "$out/bench_model.json" \
        --plot "$out/bench_model.png"
    step breakdown "$(budget 60)" "$PY" benchmarks/breakdown.py --device cuda --json "$out/breakdown.json"
    ;;
esac
[ "$failures" -eq 0 ]
