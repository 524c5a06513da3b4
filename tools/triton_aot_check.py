#!/usr/bin/env python
"""Compiles every Triton kernel launch of convbert_fast for real GPUs (sm_80, sm_90) on a machine with no GPU.

The launchers in convbert_fast/ops/triton/ are run on CPU tensors with `wrap_triton` replaced by a recorder, so
each launch they would make (forward and backward; fp32/fp16/bf16/fp64; the base, medium-small and small model
shapes, an odd shape, and every case of the op tests; each of these also as sequences packed into one row with
cu_seqlens, as the unpadded model and the packed-sequence tests run the convs) is captured with its exact
arguments instead of run.
Each launch is specialised the way Triton's own launcher does (its binder: constexprs, 16-byte alignment and
divisibility, ints equal to 1) and compiled with triton.compile for GPUTarget("cuda", arch, 32), once per
autotune config plus the single no-autotune config. ptxas runs with -v; its log gives registers and spills, and
Triton's metadata the shared memory.

Fails on a compile error, a compile over the time budget, shared memory over the GPU's per-block limit, or a
spill outside SPILL_EXCEPTIONS. Results are cached per Triton version (keyed by Triton's own source hash, which
covers the kernel's code and the jit functions it calls, and the compile options), so a warm run compiles only
what changed.

    python tools/triton_aot_check.py [--arch 80,90] [--jobs 2] [--budget 60] [--no-cache] [--json FILE]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib
import io
import itertools
import json
import multiprocessing
import os
import pkgutil
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The GPU code path: the real (autotuned) configs and launch constants, not the interpreter's.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["CONVBERT_FAST_TRITON_AUTOTUNE"] = "1"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's log; the workers capture it
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

# The shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100.
SHARED_LIMIT = {80: 166_912, 90: 232_448}
# Spills tolerated: (kernel, dtype) -> (most bytes of spill stores, why). Anything else that spills fails.
_FP64 = "fp64: twice the registers per value; only the fp64 gradchecks/tests launch it"
SPILL_EXCEPTIONS: dict[tuple[str, str], tuple[int, str]] = {
    ("_depthwise_kernel", "fp64"): (512, _FP64 + " (288 B on sm_90, triton 3.6)"),
    ("_tap_grad_kernel", "fp64"): (64, _FP64),
    ("_span_conv_fwd_kernel", "fp64"): (64, _FP64),
    ("_span_conv_grad_values_kernel", "fp64"): (64, _FP64),
    ("_separable_fwd_kernel", "fp64"): (64, _FP64),
    ("_span_conv_grad_logits_kernel", "fp64"): (64, _FP64),
    # Not fp64, still open: sm_80 only, 4-8 B, in test-case launches (the no-autotune 16x16x16 config at K=9,
    # and K=5 for the span kernel), not in the models' tuned launches.
    ("_separable_fwd_kernel", "bf16"): (16, "open: sm_80, no-autotune config, 8 B (triton 3.6)"),
    ("_separable_fwd_kernel", "fp16"): (16, "open: sm_80, no-autotune config, 8 B (triton 3.9)"),
    ("_span_conv_grad_logits_kernel", "bf16"): (8, "open: triton 3.6, sm_80, K=5, 4 B"),
}

# (label, dtype, torch.set_float32_matmul_precision): fp32 twice, its dots in IEEE fp32 and in TF32
DTYPES = [
    ("fp32", torch.float32, "highest"),
    ("tf32", torch.float32, "high"),
    ("fp16", torch.float16, "highest"),
    ("bf16", torch.bfloat16, "highest"),
    ("fp64", torch.float64, "highest"),
]
# (hidden, attention heads, intermediate, groups) of the released models; head_ratio 2, K = 9
MODELS = {"base": (768, 12, 3072, 1), "medium-small": (384, 8, 1536, 2), "small": (256, 4, 1024, 1)}
SHAPES = [(4, 512), (3, 37)]  # (B, L): a realistic one and an odd one
# The gradchecks' fp64 shapes (tests: the op gradchecks): (B, L, C, A, K), (B, L, heads, D, K), (lead, G, in, out)
GRADCHECK_SEPARABLE = [(2, 6, 3, 4, k) for k in (1, 3, 9)] + [(2, 7, 5, 6, 9)]
GRADCHECK_SPAN = [(2, 4, 2, 3, 1), (2, 6, 2, 3, 3), (2, 5, 2, 3, 9), (2, 7, 2, 3, 9), (2, 5, 2, 3, 3)]
GRADCHECK_GROUPED = [((2, 3), g, 2, 3) for g in (1, 2, 3)] + [((2, 7), 2, 3, 4)]
# Packed sequences (tests/test_packed_sequences.py's gradchecks, fp64): (lengths, C, A, K), (lengths, heads, D, K)
GRADCHECK_SEPARABLE_PACKED = [([3, 0, 1, 6], 4, 3, 3)]
GRADCHECK_SPAN_PACKED = [([3, 0, 1, 6], 2, 3, 5)]
# The test cases, read (not imported: the tests need pytest) from the files that define them
TEST_CASES = {
    "samples.py": ("SPAN_CASES", "SEPARABLE_CASES", "GROUPED_CASES"),
    "test_packed_sequences.py": ("SPAN_PACKINGS", "SEPARABLE_PACKINGS"),
}


def test_cases():
    """The op tests' cases: SPAN_CASES, SEPARABLE_CASES and GROUPED_CASES from tests/samples.py, the packed
    sequences' SPAN_PACKINGS and SEPARABLE_PACKINGS from tests/test_packed_sequences.py."""
    cases = {}
    for file, names in TEST_CASES.items():
        path = ROOT / "tests" / file
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                if name in names:
                    cases[name] = ast.literal_eval(node.value)
        missing = set(names) - cases.keys()
        if missing:
            raise SystemExit(f"triton_aot_check: {sorted(missing)} not found in tests/{file}")
    return cases


# --- recording the launches -----------------------------------------------------------------------------------


class _Recorder:
    """Stands in for wrap_triton(kernel): kernel[grid](*args, **kwargs) is logged, not run (the grid goes into the
    logged context: a tuple, or for an autotuned launch a function of the config's constants)."""

    def __init__(self, log, context, kernel):
        self.log, self.context, self.kernel = log, context, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, args, kwargs, {**self.context, "grid": grid}))


def recorder():
    """(log, context, ops): every launcher module's wrap_triton replaced by a recorder, so that calling one of `ops`
    (name -> the module's *_triton_op) appends (kernel, args, kwargs, a copy of context) to log for each launch."""
    import convbert_fast.ops.triton as package

    log, context, op = [], {}, {}
    for info in pkgutil.iter_modules(package.__path__):  # every launcher module, whatever its file is called
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(module, "wrap_triton"):
            module.wrap_triton = lambda kernel: _Recorder(log, context, kernel)
        op.update({name: getattr(module, name) for name in dir(module) if name.endswith("_triton_op")})
    return log, context, op


def record_launches():
    log, context, op = recorder()

    def empty(*shape, dtype):  # nothing runs: only shapes, dtypes, strides and alignment count
        return torch.empty(*shape, dtype=dtype)

    def offsets(lengths):  # None, or cu_seqlens over one row of len(lengths) sequences (b = 1, l = their sum)
        context["packed"] = lengths is not None
        return None if lengths is None else torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)

    def separable(b, l, c, a, k, dtype, lengths=None):
        cu = offsets(lengths)
        x, dw, pw = empty(b, l, c, dtype=dtype), empty(c, 1, k, dtype=dtype), empty(a, c, 1, dtype=dtype)
        bias, mult = empty(a, 1, dtype=dtype), empty(b, l, a, dtype=dtype)
        context["K"] = k
        op["separable_conv1d_triton_op"](x, dw, pw, bias, cu)
        op["separable_conv1d_mul_triton_op"](x, dw, pw, bias, mult, cu)
        op["separable_conv1d_backward_triton_op"](mult, x, dw, pw, bias, cu)

    def span(b, l, heads, d, k, dtype, prefix=False, lengths=None):
        cu = offsets(lengths)
        values, logits = empty(b, l, heads * d, dtype=dtype), empty(b, l, heads * k, dtype=dtype)
        context["K"] = k
        op["dynamic_span_conv_triton_op"](values, logits, heads, cu)
        if prefix:  # as the model calls it: the attention context [B, H, L, D] transposed
            attention = empty(b, heads, l, d, dtype=dtype).transpose(1, 2)
            op["dynamic_span_conv_concat_triton_op"](attention, values, logits, heads, cu)
        op["dynamic_span_conv_backward_triton_op"](values, values, logits, heads, cu)

    def packed_separable(lengths, c, a, k, dtype):
        separable(1, sum(lengths), c, a, k, dtype, lengths=lengths)

    def packed_span(lengths, heads, d, k, dtype, prefix=False):
        span(1, sum(lengths), heads, d, k, dtype, prefix=prefix, lengths=lengths)

    def grouped(lead, g, gin, gout, dtype):
        x, w, bias = empty(*lead, g * gin, dtype=dtype), empty(g, gin, gout, dtype=dtype), empty(g * gout, dtype=dtype)
        context.update(K=None, packed=False)
        op["grouped_linear_triton_op"](x, w, bias)
        op["grouped_linear_gelu_triton_op"](x, w, bias)
        op["grouped_linear_backward_triton_op"](empty(*lead, g * gout, dtype=dtype), x, w)

    for label, dtype, matmul_precision in DTYPES:
        torch.set_float32_matmul_precision(matmul_precision)  # fp32 dots follow it: IEEE or TF32 configs
        context.update(dtype=label, suite="models")
        if dtype != torch.float64:  # the models run in fp32, fp16 and bf16
            for hidden, heads, intermediate, groups in MODELS.values():
                for b, l in SHAPES:
                    separable(b, l, hidden, hidden // 2, 9, dtype)
                    span(b, l, heads // 2, hidden // heads, 9, dtype, prefix=True)
                    if (b, l) == SHAPES[0]:  # the realistic shape's rows unpadded: lengths in [L/2, L], one row
                        lengths = [l - (l // 2) * i // b for i in range(b)]
                        packed_separable(lengths, hidden, hidden // 2, 9, dtype)
                        packed_span(lengths, heads // 2, hidden // heads, 9, dtype, prefix=True)
                    if groups > 1:
                        grouped((b, l), groups, hidden // groups, intermediate // groups, dtype)
                        grouped((b, l), groups, intermediate // groups, hidden // groups, dtype)
        context["suite"] = "tests"  # tools/gpu_check.sh runs them without autotuning: see compile_tasks
        cases = test_cases()
        for case in cases["SEPARABLE_CASES"] + (GRADCHECK_SEPARABLE if dtype == torch.float64 else []):
            separable(*case, dtype)
        for case in cases["SPAN_CASES"] + (GRADCHECK_SPAN if dtype == torch.float64 else []):
            span(*case, dtype, prefix=dtype == torch.float64)
        # packed test cases: fp32 and the fp64 gradchecks (16-bit ones compile the same kernels at other dtypes,
        # which the models' packed launches above cover; all of them doubled the cold check's time)
        packed_cases = {torch.float32: True, torch.float64: False}.get(dtype)
        if packed_cases is not None:
            for case in cases["SEPARABLE_PACKINGS"] if packed_cases else GRADCHECK_SEPARABLE_PACKED:
                packed_separable(*case, dtype)
            for case in cases["SPAN_PACKINGS"] if packed_cases else GRADCHECK_SPAN_PACKED:
                packed_span(*case, dtype, prefix=True)
        for case in cases["GROUPED_CASES"] + (GRADCHECK_GROUPED if dtype == torch.float64 else []):
            grouped(*case, dtype)
    return log


# --- specialising and compiling -------------------------------------------------------------------------------


def _config_label(kwargs):
    blocks = "x".join(str(v) for k, v in kwargs.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}"


def specialise(fn, args, kwargs, arch):
    """(signature, constexprs, attrs, options) of the jit function `fn` launched with these arguments on sm_<arch>,
    as JITFunction.run builds them."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def compile_tasks(log, archs):
    """One task per distinct (kernel, specialisation, config, arch), built the way JITFunction.run builds it.

    The model shapes get every autotune config and the no-autotune one at each specialisation. The test cases
    (many small shapes, run on the GPU with CONVBERT_FAST_TRITON_AUTOTUNE=0) get the no-autotune config at each
    specialisation, and each autotune config once per dtype and K (what decides registers and shared memory
    besides the config), not again for every flag and alignment/divisibility pattern of their odd sizes."""
    from convbert_fast.ops.triton import NO_AUTOTUNE_CONFIG

    tasks, seen = [], set()
    for kernel, args, kwargs, context in log:
        if isinstance(kernel, Autotuner):
            fn, configs = kernel.fn, [c.all_kwargs() for c in (*kernel.configs, NO_AUTOTUNE_CONFIG)]
        else:
            fn, configs = kernel, [{}]
        for number, config in enumerate(configs):
            tuned_test_case = context["suite"] == "tests" and number < len(configs) - 1
            full = {**kwargs, **config}
            for arch in archs:
                signature, constexprs, attrs, options = specialise(fn, args, full, arch)
                src = ASTSource(fn, signature, constexprs, attrs)
                key = hashlib.sha256(
                    f"{triton.__version__}|{arch}|{src.hash()}|{sorted(options.__dict__.items())}".encode()
                ).hexdigest()
                constants = (fn.__name__, arch, context["dtype"], context["K"], context["packed"])
                constants += (_config_label(full),)
                if key in seen or (tuned_test_case and constants in seen):
                    continue
                seen.update((key, constants))
                labels = {**context, "kernel": fn.__name__, "arch": arch, "config": _config_label(full)}
                del labels["grid"]
                tasks.append((key, labels, fn, signature, constexprs, attrs, options.__dict__))
    return tasks


_TASKS: list = []  # set before the workers fork; they get indices
WALL_FACTOR = 5
_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


class _OverBudget(Exception):
    pass


def _on_alarm(signum, frame):
    raise _OverBudget


def _worker_init(scratch):
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=scratch)  # nothing cached: ptxas always runs, with -v
    signal.signal(signal.SIGALRM, _on_alarm)


def _cpu_seconds():
    """CPU time of this process and its finished children (ptxas): a measure of a compile that the other work on
    a shared machine does not inflate, unlike wall time."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_logged(fn, signature, constexprs, attrs, options, arch):
    """triton.compile of one specialisation for sm_<arch> -> (the compiled kernel, ptxas' -v log). Triton prints
    the log when TRITON_DUMP_PTXAS_LOG is set and ptxas runs (a Triton cache without this kernel: see
    _worker_init)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
        )
    return compiled, out.getvalue()


def ptxas_figures(log):
    """{"regs", "spill_stores", "spill_loads"} from a ptxas -v log, or None where it holds none."""
    found = {name: [int(v) for v in pattern.findall(log)] for name, pattern in _PTXAS.items()}
    if not found["regs"]:
        return None
    return {"regs": max(found["regs"]), "spill_stores": sum(found["spill_stores"]),
            "spill_loads": sum(found["spill_loads"])}


def _compile(index, budget):
    key, labels, fn, signature, constexprs, attrs, options = _TASKS[index]
    start = _cpu_seconds()
    # A wall-clock stop well past the budget: it interrupts ptxas (subprocess.run kills it) or the compiler's next
    # Python step; the budget itself is judged on CPU time below.
    signal.alarm(WALL_FACTOR * budget)
    try:
        compiled, log = compile_logged(fn, signature, constexprs, attrs, options, labels["arch"])
    except _OverBudget:
        return {"error": f"stopped after {WALL_FACTOR * budget} s of wall time", "seconds": _cpu_seconds() - start}
    except Exception as error:  # the compiler's own message is the report
        return {"error": f"{type(error).__name__}: {str(error)[-2000:]}", "seconds": _cpu_seconds() - start}
    finally:
        signal.alarm(0)
    seconds = round(_cpu_seconds() - start, 2)
    if seconds > budget:
        return {"error": f"{seconds} s of CPU time, over the {budget} s budget", "seconds": seconds}
    figures = ptxas_figures(log)
    if figures is None:
        return {"error": f"no ptxas -v log captured:\n{log[-1000:]}", "seconds": seconds}
    return {**figures, "shared": compiled.metadata.shared, "seconds": seconds}


def run(tasks, jobs, budget, cache_path):
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    results, todo = {}, []
    for index, (key, *_rest) in enumerate(tasks):
        if key in cache:
            results[key] = cache[key]
        else:
            todo.append(index)
    print(f"triton_aot_check: {len(tasks)} compiles, {len(tasks) - len(todo)} cached, {len(todo)} to run", flush=True)
    _TASKS[:] = tasks
    if todo:
        todo.sort(key=lambda i: (tasks[i][1]["suite"] != "models", -(tasks[i][1].get("K") or 0)))
        scratch = tempfile.mkdtemp(prefix="triton-aot-")
        pool = ProcessPoolExecutor(jobs, multiprocessing.get_context("fork"), _worker_init, (scratch,))
        with contextlib.ExitStack() as cleanup, pool:
            cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
            futures = {pool.submit(_compile, i, budget): i for i in todo}
            for done, future in enumerate(futures, 1):
                key = tasks[futures[future]][0]
                results[key] = future.result()
                if "error" not in results[key]:
                    cache[key] = results[key]  # failures are retried next time
                if done % 10 == 0:
                    if done % 100 == 0:
                        print(f"  {done}/{len(todo)} compiled", flush=True)
                    if cache_path:
                        _save(cache_path, cache)
        if cache_path:
            _save(cache_path, cache)
    return [(labels, results[key]) for key, labels, *_rest in tasks]


def _save(path, cache):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache))
    tmp.replace(path)


# --- the report -------------------------------------------------------------------------------------------------


def problems(labels, result):
    if "error" in result:
        return [result["error"]]
    found = []
    if result["shared"] > SHARED_LIMIT[labels["arch"]]:
        found.append(f"shared memory {result['shared']} B > {SHARED_LIMIT[labels['arch']]} B")
    spills = result["spill_stores"] + result["spill_loads"]
    allowed = SPILL_EXCEPTIONS.get((labels["kernel"], labels["dtype"]), (0, ""))[0]
    if result["spill_stores"] > allowed or (spills and not allowed):
        found.append(f"spills {result['spill_stores']} B stored, {result['spill_loads']} B loaded")
    return found


def report(rows):
    """One line per kernel, packed or not (cu_seqlens), dtype, config and arch: the worst over its specialisations
    (shapes, K): registers, bytes of spill stores (ptxas), shared memory per block (Triton), CPU seconds of the
    slowest compile."""
    table = {}
    for labels, result in rows:
        kernel = labels["kernel"] + (" packed" if labels.get("packed") else "")
        line = (kernel, labels["dtype"], labels["config"], labels["arch"])
        entry = table.setdefault(line, {"n": 0, "regs": 0, "spill": 0, "shared": 0, "seconds": 0.0, "K": set()})
        entry["n"] += 1
        if labels.get("K") is not None:
            entry["K"].add(labels["K"])
        if "error" in result:
            entry["error"] = True
            continue
        entry["regs"] = max(entry["regs"], result["regs"])
        entry["spill"] = max(entry["spill"], result["spill_stores"])
        entry["shared"] = max(entry["shared"], result["shared"])
        entry["seconds"] = max(entry["seconds"], result["seconds"])
    header = f"{'kernel':<37} {'dtype':<5} {'config':<22} {'sm':>3} {'n':>3} {'regs':>5} {'spill st':>8} "
    print(header + f"{'smem B':>8} {'max s':>6}  K")
    for (kernel, dtype, config, arch), e in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3])):
        ks = ",".join(str(k) for k in sorted(e["K"]))
        flag = "  FAILED" if e.get("error") else ""
        print(
            f"{kernel:<37} {dtype:<5} {config:<22} {arch:>3} {e['n']:>3} {e['regs']:>5} {e['spill']:>8} "
            f"{e['shared']:>8} {e['seconds']:>6.1f}  {ks}{flag}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma separated")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--budget", type=int, default=60, help="seconds one compile may take")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--json", type=Path, help="write every compile's labels and result here")
    parser.add_argument("--only", default="", help="a regex: compile only the kernels whose name matches")
    parser.add_argument("--suite", choices=("models", "tests", "all"), default="all", help="whose launches")
    parser.add_argument("--max-k", type=int, default=1000, help="leave out the launches of larger kernel sizes")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    start = time.perf_counter()
    print(f"triton_aot_check: triton {triton.__version__}, torch {torch.__version__}, sm_{archs}", flush=True)
    tasks = [t for t in compile_tasks(record_launches(), archs) if re.search(args.only, t[1]["kernel"])
             and (t[1].get("K") or 0) <= args.max_k and args.suite in ("all", t[1]["suite"])]
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convbert_fast"
    cache_path = None if args.no_cache else cache_dir / f"triton-aot-{triton.__version__}.json"
    rows = run(tasks, args.jobs, args.budget, cache_path)
    report(rows)
    if args.json:
        args.json.write_text(json.dumps([{**labels, **result} for labels, result in rows], indent=0))
    failures = [(labels, found) for labels, result in rows for found in [problems(labels, result)] if found]
    for labels, found in failures:
        packed = " packed" if labels.get("packed") else ""
        print(f"FAILED {labels['kernel']}{packed} {labels['dtype']} {labels['config']} sm_{labels['arch']} "
              f"K={labels.get('K')}: {'; '.join(found)}")
    print(f"triton_aot_check: triton {triton.__version__}: {len(rows)} compiles, {len(failures)} failed, "
          f"{time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
