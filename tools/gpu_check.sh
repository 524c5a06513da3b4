#!/usr/bin/env bash
# The checks that need a GPU, in three phases, run in order of value:
#
#   tools/gpu_check.sh test     OUTDIR   # info, the CUDA cases of the suite (v2 kernels, then v1; packed sequences
#                                        # included), the autotuned Triton configs at base shapes
#   tools/gpu_check.sh sanitize OUTDIR   # compute-sanitizer memcheck (caching allocator off) and racecheck, op tests
#                                        # (packed sequences and bad offsets called directly included)
#   tools/gpu_check.sh bench    OUTDIR   # the op benchmarks (their packed groups included), the model benchmark and
#                                        # the breakdown
#   tools/gpu_check.sh test,bench OUTDIR # phases in one command, under one cap (GPU_CHECK_CAP, default 560 s)
#
# A lease is 15 minutes of device time, start-up (a minute or two) included, and a machine goes back 30 s after
# a call returns: so the GPU pass is one command of `test,bench` (timeout_s 600), then at once, while the machine
# is warm, `GPU_CHECK_CAP=<what is left> tools/gpu_check.sh sanitize`. `tools/ci_gpu_image.sh --build-only .gpu`
# makes the CUDA extension here beforehand: carried (`carry: [".gpu"]`), it is used where none is built and it
# was built from the sources there, and no GPU time goes to the build.
#
# Each phase builds convbert_fast._C in place first when it is not built with CUDA kernels (this GPU's arch
# only; budget 150 s), runs every step under `timeout`, and writes OUTDIR/PHASES-summary.txt (what ran, passed,
# failed and was skipped, and why), OUTDIR/PHASES-logs.tar.gz (every step's log and JUnit XML) and, for bench,
# its five records: 7 files at most. A step's limit is its planned budget, cut to what is left of the cap after
# the budgets of the steps and phases behind it. Without a GPU a phase goes as far as it can and stops at its
# first GPU-only step, saying so (exit 3); with GPU_CHECK_REHEARSE=1 it runs those steps on the CPU instead,
# with tiny shapes, so that every command line, selection and record is tried here (the tests that need a GPU
# skip there, and are counted).
# The interpreter is ${PYTHON:-python3} (on the GPU image the one that holds torch is python3).
set -uo pipefail
usage="usage: tools/gpu_check.sh PHASE[,PHASE...] OUTDIR   (phases: test, sanitize, bench)"
IFS=, read -r -a phases <<<"${1:-}"
[ ${#phases[@]} -gt 0 ] || { echo "$usage" >&2 && exit 2; }
for p in "${phases[@]}"; do
    case "$p" in test | sanitize | bench) ;; *) echo "$usage" >&2 && exit 2 ;; esac
done
phase=$(IFS=-; echo "${phases[*]}")  # the files' name: test-bench-summary.txt
out=${2:?$usage}
PY=${PYTHON:-python3}
# seconds for all steps; the archive and the summary take a few more. One phase fits a call of 8 minutes; phases
# together a call of 10 (timeout_s 600).
PHASE_CAP=${GPU_CHECK_CAP:-$([ ${#phases[@]} -eq 1 ] && echo 465 || echo 560)}
BUILD_BUDGET=150  # an estimate from CPU build times: the build line of the summary gives the real one
# the least each phase needs, kept back from the phases before it when they run in one command
declare -A PHASE_FLOOR=([test]=200 [sanitize]=150 [bench]=280)
REHEARSE=${GPU_CHECK_REHEARSE:-0}
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
reserve=0  # the floors of the phases after the one running
left() { echo $((PHASE_CAP - reserve - ($(date +%s) - phase_start))); }

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
    say "${phases[*]}: $verdict | steps: $steps_ran ran, $steps_passed passed, $failures failed, $steps_skipped skipped" \
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
commit=$(git rev-parse --short HEAD 2>/dev/null) || commit="? (not a git checkout)"
say "gpu_check ${phases[*]}  $(date -u +%FT%TZ)  commit $commit" \
    "$(git rev-parse -q HEAD >/dev/null 2>&1 && ! git diff --quiet HEAD && echo '(with uncommitted changes)')  cap ${PHASE_CAP} s" \
    "$([ "$REHEARSE" = 1 ] && echo '(REHEARSAL: the GPU steps run on the CPU, tiny shapes)')"
say "plan (s): preflight 60, build $BUILD_BUDGET (if not built), then"
for p in "${phases[@]}"; do
    case $p in
        test) say "  test: info 45, cuda-host 60, cuda-tests: the rest but 100, tests-v1 50, autotuned 50" ;;
        sanitize) say "  sanitize: memcheck: the rest but 90, racecheck 90" ;;
        bench) say "  bench: bench-ops 75 (packed groups included), bench-model 60, bench-compiled: the rest but 40, breakdown 40" ;;
    esac
done
[ ${#phases[@]} -gt 1 ] && say "  (each phase keeps back for those after it: test 200, sanitize 150, bench 280)"
floors() { local total=0 p; for p in "$@"; do total=$((total + PHASE_FLOOR[$p])); done; echo $total; }
reserve=$(floors "${phases[@]:1}")  # preflight and build keep back all but the first phase's floor
printf '%-14s %-8s %5s %6s  %s\n' step result time limit detail | tee -a "$summary"

# --- the extension built beforehand for the GPU image (tools/ci_gpu_image.sh --build-only .gpu): copied in where
# none is built here, when it was built from these sources (hashed as there); the preflight says whether it loads
prebuilt=""
if [ -f .gpu/_C.abi3.so ] && [ ! -e convbert_fast/_C.abi3.so ]; then
    sources_hash=$(find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
    if [ "$(cat .gpu/sources.sha256 2>/dev/null)" = "$sources_hash" ]; then
        cp .gpu/_C.abi3.so convbert_fast/_C.abi3.so
        prebuilt="the prebuilt .gpu/_C.abi3.so copied in (the build line below says what it loads with)"
    else
        prebuilt=".gpu/_C.abi3.so was built from other sources than these (.gpu/sources.sha256): not used"
    fi
fi

# --- preflight: the interpreter, its packages, the GPU -----------------------------------------------------------
if ! command -v "$PY" >/dev/null; then
    failures=1
    say "preflight      FAILED   '$PY' is not on PATH (set PYTHON=/path/to/python)"
    exit 1
fi
{ command -v nvidia-smi >/dev/null || echo "not found"; } >"$logs/nvidia-smi.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$logs/nvidia-smi.log" 2>&1
step preflight "$(budget 60)" "$PY" -c "
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
[ -n "$prebuilt" ] && say "               $prebuilt"
no_gpu="a CUDA GPU, and torch here sees none ($(grep -o 'torch [^ ]*' "$logs/preflight.log" | head -n 1), no GPU visible)"

# --- build, when convbert_fast._C is missing or has no CUDA kernels ---------------------------------------------
if [ "$built" = cuda ] || { [ "$built" = cpu ] && [ "$gpu" = 0 ]; }; then
    skip build "convbert_fast._C is built ($built kernels)"
else
    # this GPU's arch only (setup.py's default builds two); MAX_JOBS: setup.py's default (cores, memory-capped)
    arch_list=${TORCH_CUDA_ARCH_LIST:-$arch}
    [ "$arch_list" = none ] && arch_list="8.0;9.0+PTX"  # no GPU to ask: setup.py's default
    step build "$(budget $BUILD_BUDGET)" env TORCH_CUDA_ARCH_LIST="$arch_list" "$PY" setup.py build_ext --inplace || { say "the build failed: nothing else can run (build.log)" && exit 1; }
fi

# --- the phases ---------------------------------------------------------------------------------------------------
pytest_base=("$PY" -m pytest -q -rfE -p no:cacheprovider)
if ! "$PY" -c "import tensorflow" 2>/dev/null; then  # GPU images often lack it; CI runs that file on the CPU
    pytest_base+=(--ignore=tests/test_tf_checkpoint.py)
fi
# tests in parallel processes where pytest-xdist is there (the GPU image has it): most of a CUDA test's time is
# compiling its kernels (Triton's, inductor's) on the CPU, and the machine has 16 cores for one GPU
parallel=()
"$PY" -c "import xdist" 2>/dev/null && parallel=(-n "${GPU_CHECK_WORKERS:-6}")

gpu_step() {  # gpu_step NAME: a GPU is here, or this is a rehearsal; else the phase stops at NAME
    [ "$gpu" = 1 ] || [ "$REHEARSE" = 1 ] || stop "$1" "$no_gpu"
}

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

phase_test() {
    step info "$(budget 45)" "$PY" -m convbert_fast info
    gpu_step cuda-host
    # first what only a GPU shows of issue 24: CUDA graph capture and reduce-overhead with dropout (new masks per
    # replay), the kernel choice flipped from another thread while ops run, the extension's code for this GPU
    step cuda-host "$(budget 60 200)" "${pytest_base[@]}" tests/test_cuda_host.py \
        -k "cuda_graph or reduce_overhead or flipped or falls_back or code_for_this_gpu" \
        --junitxml="$logs/cuda-host.xml"
    # the CUDA cases of the whole suite (ids with cuda or gpu), one Triton config per kernel (autotuning every
    # test shape would not fit); then the autotuned configs, each checked at ConvBERT-base shapes
    # (CONVBERT_FAST_CUDA_KERNELS=tiled: v2 takes the tiled kernels only from a size the tests' shapes stay below)
    step cuda-tests "$(rest 100)" env CONVBERT_FAST_TRITON_AUTOTUNE=0 CONVBERT_FAST_CUDA_KERNELS=tiled \
        "${pytest_base[@]}" "${parallel[@]}" tests -k "(cuda or gpu) and not test_cuda_host" \
        --junitxml="$logs/cuda-tests.xml"
    # the general (v1) CUDA kernels too, while both sets exist (README: two sets of CUDA kernels), packed included
    step tests-v1 "$(budget 50 50)" env CONVBERT_FAST_CUDA_KERNELS=v1 \
        "${pytest_base[@]}" "${parallel[@]}" tests/test_dynamic_span_conv.py tests/test_separable_conv1d.py \
        tests/test_dropout_add_layer_norm.py tests/test_packed_sequences.py -k "cuda and not triton and not eager" \
        --junitxml="$logs/tests-v1.xml"
    step autotuned "$(budget 50)" env CONVBERT_FAST_TRITON_AUTOTUNE=1 \
        "${pytest_base[@]}" "${parallel[@]}" tests -k "autotuned or (full_shapes and triton)" --junitxml="$logs/autotuned.xml"
}

phase_sanitize() {
    local sanitizer="" wrap_memcheck=() wrap_racecheck=() picks op_tests
    if sanitizer=$(find_sanitizer); then
        say "               compute-sanitizer: $sanitizer"
    else
        say "               compute-sanitizer: not found on PATH nor under the CUDA toolkit"
    fi
    gpu_step memcheck
    if [ -n "$sanitizer" ] && [ "$gpu" = 1 ]; then  # the rehearsal runs the selections without it
        wrap_memcheck=("$sanitizer" --tool memcheck --error-exitcode 99 --print-limit 20)
        wrap_racecheck=("$sanitizer" --tool racecheck --error-exitcode 99 --print-limit 20)
    elif [ "$REHEARSE" != 1 ]; then
        stop memcheck "compute-sanitizer, not found on PATH nor under the CUDA toolkit's bin"
    fi
    # the step's own limit replaces pytest-timeout's per-test one: everything runs far slower under the sanitizer
    op_tests=(tests/test_separable_conv1d.py tests/test_dynamic_span_conv.py tests/test_grouped_linear.py
              tests/test_dropout_add_layer_norm.py tests/test_packed_sequences.py)
    # the cpp and Triton CUDA kernels of all four ops (not eager: torch's own), forward and backward, dropout
    # included, fp32 values and fp64 gradients, and the direct calls the C++ checks refuse; the caching allocator
    # off, so that an access past a tensor's end leaves its cudaMalloc block; packed sequences, and the ops called
    # directly with offsets that break every rule (the kernels clamp what they find)
    picks="matches_reference and float32 and not multiplier and not prefix or gradients_match_reference"
    picks+=" or strided_slice or nan_spreads or drops_with or direct_calls_check_every_tensor"
    picks+=" or packed_sequences_matches_the_reference and float32 or bad_offsets_stay_inside"
    step memcheck "$(rest 90)" env CONVBERT_FAST_TRITON_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "${wrap_memcheck[@]}" "${pytest_base[@]}" -o timeout=0 "${op_tests[@]}" \
        -k "cuda and not eager and ($picks)" --junitxml="$logs/memcheck.xml"
    # the hand-written kernels, whose threads share memory: span conv, depthwise conv, LayerNorm (with dropout)
    step racecheck "$(budget 90)" env CONVBERT_FAST_TRITON_AUTOTUNE=0 \
        "${wrap_racecheck[@]}" "${pytest_base[@]}" -o timeout=0 "${op_tests[@]}" \
        -k "cuda and not eager and not triton and (matches_reference and float32 and not multiplier and not prefix or gradients_match_reference or drops_with or packed_sequences_matches_the_reference and float32)" \
        --junitxml="$logs/racecheck.xml"
}

phase_bench() {
    local ops_args model_args compiled_args breakdown_args
    gpu_step bench-ops
    # the model, bf16 autocast, 12 layers, B=32, L=512: first the providers that compile nothing (full and padded
    # rows), then transformers beside the two compiled ones (full rows: each graph costs a compile). Each record
    # is rewritten after every batch, so a time limit keeps what was measured.
    local shape=(--seq-len 512 --repeats 10)
    ops_args=(--bench-device cuda)
    breakdown_args=(--device cuda)
    if [ "$gpu" = 0 ]; then  # the rehearsal: the same steps, tiny, on the CPU
        shape=(--device cpu --config small --layers 1 --batch-size 2 --seq-len 16 --repeats 1 --warmup 0)
        ops_args=(--bench-device cpu --bench-size tiny -k "not triton")  # Triton's interpreter: minutes here
        breakdown_args=(--device cpu --layers 1 --batch-size 1 --seq-len 16 --rounds 3)
    fi
    model_args=("${shape[@]}" --providers transformers,cpp,cpp-unpadded,triton)
    compiled_args=("${shape[@]}" --no-pad --providers transformers,transformers-compile,compile)
    step bench-ops "$(budget 75 140)" "${pytest_base[@]}" benchmarks "${ops_args[@]}" --benchmark-only \
        --benchmark-group-by=group --benchmark-json="$out/bench_ops.json"
    step bench-model "$(budget 60 80)" "$PY" -m convbert_fast bench "${model_args[@]}" \
        --json "$out/bench_model.json" --plot "$out/bench_model.png"
    step bench-compiled "$(rest 40)" "$PY" -m convbert_fast bench "${compiled_args[@]}" \
        --json "$out/bench_compiled.json"
    step breakdown "$(budget 40)" "$PY" benchmarks/breakdown.py "${breakdown_args[@]}" --json "$out/breakdown.json"
}

for i in "${!phases[@]}"; do
    reserve=$(floors "${phases[@]:i+1}")
    say "--- ${phases[i]}: $(left) s for it, ${reserve} s kept for the phases after it"
    "phase_${phases[i]}"
done
[ "$failures" -eq 0 ]
