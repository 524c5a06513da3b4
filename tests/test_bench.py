"""`python -m convbert_fast bench` as a user runs it: a table, a JSON record and a PNG; clear errors; compiled
providers really compiled; memory, padding and the README's tables from committed records."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convbert_fast.bench import choose, providers, record, report, timing
from convbert_fast import cli
from convbert_fast.ops import cpp
from convbert_fast.configs import named_config

ROOT = Path(__file__).parent.parent


def child_env() -> dict:
    """The environment of a child that runs a command as a user would: this tree's package first (breakdown.py's
    own directory would come first otherwise), and without the KINETO_LOG_LEVEL that importing the bench here set,
    so that the command has to silence kineto itself."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])}


def bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "convbert_fast", "bench", *args], capture_output=True, text=True, timeout=900, cwd=ROOT,
        env=child_env(),
    )  # fmt: skip


ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None  # the `onnx` extra, in `test`


@pytest.mark.timeout(600)  # a benchmark run in a child process, two dtypes and ONNX exports: 225 s on the loaded Xeon
def test_bench_writes_table_json_and_plot(tmp_path):
    record_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = bench(
        "--config", "small", "--layers", "1", "--batch-size", "2", "--seq-len", "8,16", "--repeats", "2",
        "--warmup", "0", "--providers", "transformers,eager,cpp,cpp-unpadded,triton,onnxruntime-transformers",
        "--dtype", "fp32,bf16",
        "--json", str(record_path), "--plot", str(plot_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "train x eager" in result.stdout and "dynamic_span_conv fwd+bwd at base shapes" in result.stdout
    # kineto's `USDT: ... profiler_start` lines (a profiler session per memory measurement) are silenced
    assert "profiler_start" not in result.stderr and "USDT" not in result.stderr, result.stderr
    # nor torch.onnx.export's lines about torchvision, pytree and shared axis names (cli.quiet_exporters)
    for noise in ("torchvision is not installed", "UserWarning", "FutureWarning"):
        assert noise not in result.stderr, result.stderr
    if not torch.cuda.is_available():  # a provider that cannot run here is skipped with its reason
        assert re.search(r"triton\s+skipped: Triton", result.stdout)
    record = json.loads(record_path.read_text())
    for key in ("device", "versions", "date", "git_commit", "git_dirty", "memory_tool", "measurements", "ops",
                "cpu_isa", "copy_bandwidth_gbps", "rounds_rule", "cpu_allocator", "cpu_inference_gemm"):  # fmt: skip
        assert key in record
    if not torch.cuda.is_available() and platform.libc_ver()[0] == "glibc":
        assert record["cpu_allocator"].startswith("glibc malloc, thresholds fixed for the run"), record["cpu_allocator"]
    if not torch.cuda.is_available():
        assert record["cpu_isa"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert {type(record["cpu_isa"][k]) for k in ("amx", "avx512_bf16")} <= {bool}
        threads = int(re.search(r"\((\d+) threads\)", record["device"])[1])  # the run's torch.get_num_threads()
        assert record["cpu_isa"]["kernel_threads"] == (threads if cpp.LOADED else None)
    assert 0.2 < record["copy_bandwidth_gbps"] < 20000  # a DRAM copy of any machine here (see test_copy_bandwidth)
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", record["git_commit"]) and isinstance(record["git_dirty"], bool)
    else:  # a copy of the tree without its history (CI's GPU-image run): no commit to name, and none invented
        assert record["git_commit"] is None and record["git_dirty"] is None
    assert set(record["versions"]) == {"python", "torch", "triton", "transformers", "cuda", "driver"}
    summary = record["summary"]
    for key in ("train_step_vs_eager", "train_step_vs_compile", "inference_vs_eager", "peak_memory_vs_eager",
                "padded_train_step_vs_eager", "heavy_train_step_vs_eager", "span_conv_vs_eager",
                "span_conv_bandwidth_fraction", "padded_unpadded_train_step_vs_eager",
                "heavy_unpadded_train_step_vs_ours", "unpadded_inference_vs_ours"):  # fmt: skip
        assert key in summary
    assert summary["train_step_vs_eager"] > 0 and summary["span_conv_vs_eager"] > 0
    assert summary["train_step_vs_compile"] is None  # transformers-compile was not asked for
    assert [ops["dtype"] for ops in record["ops"]] == ["float32", "bfloat16"]
    for ops in record["ops"]:
        for op in ("dynamic_span_conv", "separable_conv1d", "grouped_linear"):
            assert ops[op]["eager_ms"] > 0 and ops[op]["ms"] > 0
    measured = [m for m in record["measurements"] if m["skipped"] is None]
    ort_name = providers.ORT_BASELINE
    trained = [m for m in measured if m["provider"] != ort_name]
    # every length with full rows and both paddings in both dtypes, each with its own memory measured alone
    assert {(m["provider"], m["dtype"], m["seq_len"], m["padding"]) for m in trained} == {
        (p, dtype, length, padding) for p in ("transformers", "eager", "cpp", "cpp-unpadded")
        for dtype in ("fp32", "bf16") for length in (8, 16) for padding in ("none", "half", "heavy")
    }  # fmt: skip
    if not torch.cuda.is_available():  # the fp32 forwards' GEMMs on packed weights: a library per shape
        gemms = record["cpu_inference_gemm"]
        assert gemms and set(gemms.values()) <= {"mkl", "onednn"}, gemms
        assert {"16x256x256", "32x256x256"} <= set(gemms), gemms  # the small shape's attention output, full rows
    for m in trained:
        assert m["train_step_ms"] > 0 and m["forward_ms"] > 0 and m["rounds"] == 2 and not m["inference_only"]
        assert len(m["forward_ms_rounds"]) == len(m["train_step_ms_rounds"]) == 2  # every round's time, kept
        assert m["forward_ms"] == pytest.approx(timing.headline(m["forward_ms_rounds"]), abs=2e-3)
        assert m["forward_backward_peak_mb"] > m["activation_memory_mb"] > 0
        assert m["peak_memory_mb"] == max(m["forward_backward_peak_mb"], m["optimizer_step_peak_mb"])
        assert m["compiled"] is None and m["dynamo"] is None  # not compiled providers
        full = m["batch_size"] * m["seq_len"]
        assert m["padded"] == (m["padding"] != "none")
        low = {"none": full, "half": full / 2, "heavy": m["batch_size"] * min(8, m["seq_len"])}[m["padding"]]
        assert low <= m["tokens"] <= full
        # the output against transformers' in the same dtype over the real tokens (the padding-invariant mode's
        # against our eager backend in that mode): eager is transformers' math, cpp within rounding
        bound = {"fp32": 1e-4, "bf16": 0.1}[m["dtype"]]  # bf16: a few units in the last place of outputs ~ 1
        assert m["max_abs_diff"] == 0.0 if m["provider"] in ("transformers", "eager") else m["max_abs_diff"] < bound
        if m["provider"] != "transformers":  # each ratio of the table with its standard error over the rounds
            against_ort = {f"forward vs {ort_name}"} if ONNXRUNTIME and m["dtype"] == "fp32" else set()
            assert set(m["ratio_se"]) == {"forward vs transformers", "train_step vs transformers"} | against_ort
    # each provider alone: its weights, gradients and AdamW's two moments (4x the fp32 weights), not two models;
    # forward + backward less activations is exactly those, and the optimizer step holds them all plus its scratch
    at = {(m["provider"], m["dtype"], m["seq_len"], m["padding"]): m for m in trained}
    weights_mb = sum(p.numel() for p in _small_model().parameters()) * 4 / 2**20
    for m in trained:
        assert m["forward_backward_peak_mb"] - m["activation_memory_mb"] == pytest.approx(4 * weights_mb, rel=1e-3)
        assert m["optimizer_step_peak_mb"] >= 4 * weights_mb
    assert at["transformers", "fp32", 16, "none"]["activation_memory_mb"] > at["transformers", "fp32", 8, "none"][
        "activation_memory_mb"
    ]
    # ONNX Runtime on transformers' graph: the forward only, its output within fp32 rounding of transformers',
    # skipped in bf16 with why
    ort = [m for m in record["measurements"] if m["provider"] == ort_name]
    assert len(ort) == 12
    for m in ort:
        if m["dtype"] == "bf16":
            assert m["skipped"] == "deploy artifacts are exported in fp32"
        elif not ONNXRUNTIME:
            assert "onnxruntime" in m["skipped"] and "pip install" in m["skipped"]
        else:
            assert m["skipped"] is None and m["inference_only"] and m["forward_ms"] > 0 and m["rounds"] == 2
            assert m["train_step_ms"] is None and m["train_tokens_per_s"] is None and m["peak_memory_mb"] is None
            assert m["max_abs_diff"] < 1e-4 and set(m["ratio_se"]) == {"forward vs transformers"}
    if ONNXRUNTIME:
        assert re.search(rf"fp32\s+16\s+half {ort_name} .*inference only: no training step", result.stdout)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)  # a benchmark run in a child process, stopped after its first batch
def test_a_run_stopped_by_sigint_keeps_what_it_measured(tmp_path):
    """gpu_check's time limits send SIGINT: the record written after each batch survives, says where the run
    stopped and that it is incomplete, the README's tables say so too, and the exit status is 130."""
    import signal
    import time

    record_path = tmp_path / "bench.json"
    lengths = ",".join(str(8 * i) for i in range(1, 41))  # 80 batches: far more than run before the signal
    child = subprocess.Popen(
        [sys.executable, "-m", "convbert_fast", "bench", "--config", "small", "--layers", "1", "--batch-size", "1",
         "--seq-len", lengths, "--padding", "none,half", "--repeats", "1", "--warmup", "0", "--providers", "transformers,cpp",
         "--json", str(record_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        # started with SIGINT ignored, as a shell without job control starts `cmd &`: the bench must listen anyway
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        if record_path.exists() and json.loads(record_path.read_text() or "{}").get("measurements"):
            break
        time.sleep(0.2)
    assert child.poll() is None, child.communicate()
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert "STOPPED: interrupted (SIGINT) after" in stderr and "(incomplete)" in stdout
    record = json.loads(record_path.read_text())
    assert record["complete"] is False
    assert re.fullmatch(r"interrupted \(SIGINT\) after \d+ of 80 batches", record["stopped"])
    done = {(m["seq_len"], m["padding"]) for m in record["measurements"]}
    assert (8, "none") in done and len(done) < 80 and record["ops"][0]["dynamic_span_conv"]["ms"] > 0
    assert all(m["skipped"] is None and m["train_step_ms"] > 0 for m in record["measurements"])
    blocks = report.markdown_blocks([str(record_path)])
    assert f"**Incomplete run: {record['stopped']}.**" in blocks["model"]


def test_op_benchmarks_stopped_mid_way_keep_the_finished_ones(tmp_path):
    """pytest-benchmark's JSON fails on a benchmark stopped before its first round ended (min() of nothing), losing
    every other result; benchmarks/conftest.py drops that one, so a time limit's SIGINT keeps the finished ones.
    The stop is a KeyboardInterrupt raised inside the benchmarked function, as SIGINT raises it."""
    (tmp_path / "test_two.py").write_text(
        "def test_finished(benchmark):\n"
        "    benchmark.pedantic(lambda: None, rounds=3)\n"
        "def test_stopped(benchmark):\n"
        "    def stop():\n"
        "        raise KeyboardInterrupt\n"
        "    benchmark.pedantic(stop, rounds=3)\n"
    )
    json_path = tmp_path / "ops.json"
    # its conftest, loaded as a plugin by name; not as an xdist worker (pytest-benchmark then disables itself)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = str(ROOT / "benchmarks")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "test_two.py",
         f"--benchmark-json={json_path}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert "KeyboardInterrupt" in result.stdout and "empty sequence" not in result.stdout + result.stderr, result
    assert [b["name"] for b in json.loads(json_path.read_text())["benchmarks"]] == ["test_finished"]


def _op_bench(group, provider, median_ms, family="hopper"):
    """One benchmark as pytest-benchmark's JSON holds it (the fields `measured_choices` reads)."""
    extra = {"device": "NVIDIA H100 80GB HBM3", "gpu_family": family} if family else {"device": "a CPU"}
    return {"group": group, "params": {"provider": provider}, "stats": {"median": median_ms / 1e3},
            "extra_info": extra}  # fmt: skip


def test_choose_sums_each_ops_groups_and_needs_both_backends(tmp_path, capsys):
    g_span, g_sep, g_sepq = "dynamic_span_conv fwd+bwd", "separable_conv1d fwd+bwd", "separable_conv1d * query fwd+bwd"
    g_ffn, g_gelu = "grouped_linear 384->1536 G=2 fwd+bwd", "grouped_linear 384->1536 G=2 + GELU fwd+bwd"
    benchmarks = [
        _op_bench(g_span, "cpp", 1.0), _op_bench(g_span, "triton", 1.5), _op_bench(g_span, "transformers", 9.0),
        # separable: triton wins one group, cpp the other, and the sum decides (cpp 2.0 + 5.0 < 3.0 + 4.5)
        _op_bench(g_sep, "cpp", 2.0), _op_bench(g_sep, "triton", 3.0),
        _op_bench(g_sepq, "cpp", 5.0), _op_bench(g_sepq, "triton", 4.5),
        _op_bench(g_ffn, "cpp", 2.0), _op_bench(g_ffn, "triton", 1.0),
        _op_bench(g_gelu, "cpp", 2.5), _op_bench(g_gelu, "triton", 1.5), _op_bench(g_gelu, "cpp-v1", 0.1),
        # only one of the two backends: no choice to make
        _op_bench("dropout_add_layer_norm C=768 p=0.1 fwd+bwd", "cpp", 1.0),
    ]  # fmt: skip
    choices = choose.measured_choices({"benchmarks": benchmarks})
    assert {op: c["backend"] for op, c in choices.items()} == {
        "dynamic_span_conv": "cpp", "separable_conv1d": "cpp", "grouped_linear": "triton"
    }  # fmt: skip
    assert choices["separable_conv1d"]["ms"] == pytest.approx({"cpp": 7.0, "triton": 7.5})
    # a backend that missed one of the op's groups is not compared on the sum of the others
    partial = [b for b in benchmarks if not (b["group"] == g_gelu and b["params"]["provider"] == "triton")]
    assert "grouped_linear" not in choose.measured_choices({"benchmarks": partial})
    path = tmp_path / "ops.json"
    path.write_text(json.dumps({"datetime": "2026-11-27T10:00:00", "benchmarks": benchmarks}))
    assert cli.main(["bench", "--choose", str(path)]) == 0
    out = capsys.readouterr().out
    assert '("hopper", "grouped_linear"): "triton",  # cpp 4.500 ms, triton 2.500 ms' in out
    assert "NVIDIA H100 80GB HBM3, 2026-11-27" in out
    assert f"# CUDA kernels, {g_gelu}: v1 0.100 ms, v2 2.500 ms: v1 faster" in out
    # a CPU record fills no CUDA choice
    path.write_text(json.dumps({"benchmarks": [_op_bench(g_span, "cpp", 1.0, family=None)]}))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--choose", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "not a CUDA op-benchmark record" in err and err.count("\n") == 1


def _small_model():
    import transformers

    return transformers.ConvBertModel(named_config("small", num_hidden_layers=1, max_position_embeddings=512))


@pytest.mark.timeout(300)  # torch.compile of a model for two lengths and two modes: 80 s on a loaded 2-core EPYC
def test_compiled_providers_get_a_graph_per_length_and_phase(tmp_path):
    """Two lengths with dynamo's recompile limit at 2, the graphs one length needs (eval and training): without a
    reset per length the second would run eagerly and be marked so."""
    import torch._dynamo

    record_path = tmp_path / "bench.json"
    args = ["bench", "--config", "small", "--layers", "1", "--batch-size", "1", "--seq-len", "8,16", "--repeats", "1",
            "--warmup", "1", "--no-pad", "--providers", "compile", "--json", str(record_path)]  # fmt: skip
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the option from torch 2.11's config module
    with torch._dynamo.config.patch(recompile_limit=2):
        assert cli.main(args) == 0
    measurements = json.loads(record_path.read_text())["measurements"]
    assert [(m["seq_len"], m["padding"]) for m in measurements] == [(8, "none"), (16, "none")]
    for m in measurements:
        assert m["skipped"] is None and m["compiled"] is True, m
        for phase in ("forward", "train_step"):
            counts = m["dynamo"][phase]
            assert counts["graphs"] >= 1 and counts["frames_ok"] == counts["frames"] >= 1, (phase, counts)


def test_a_frame_left_to_eager_is_marked_not_compiled():
    import torch._dynamo

    torch._dynamo.reset()
    fn = torch.compile(lambda x: x.sin() + 1, dynamic=False)
    first, second = timing.DynamoCounts(), timing.DynamoCounts()
    with torch._dynamo.config.patch(recompile_limit=1):
        first.around(lambda: fn(torch.ones(3)))
        second.around(lambda: fn(torch.ones(4)))  # a second shape: past the limit, dynamo runs it eagerly
    assert first.compiled and first.counts["graphs"] == 1
    assert not second.compiled and second.counts["frames"] == 1 and second.counts["frames_ok"] == 0
    label = report.provider_label({"provider": "compile", "compiled": second.compiled})
    assert label == "compile (NOT compiled: fell back to eager)"
    torch._dynamo.reset()


def test_padded_batches_are_seeded_and_masked():
    config = named_config("small", num_hidden_layers=1)
    ids, mask, tokens = providers.make_batch(config, 64, 9, "half", torch.device("cpu"), seed=3)
    again = providers.make_batch(config, 64, 9, "half", torch.device("cpu"), seed=3)
    assert torch.equal(ids, again[0]) and torch.equal(mask, again[1])
    lengths = mask.sum(1)
    assert lengths.min() >= 5 and lengths.max() <= 9 and len(set(lengths.tolist())) > 1 and tokens == lengths.sum()
    assert torch.equal(mask, (torch.arange(9) < lengths[:, None]).long())  # real tokens first, then padding
    assert (ids[mask == 0] == config.pad_token_id).all() and (ids[mask == 1] >= 5).all()
    ids, mask, tokens = providers.make_batch(config, 2, 9, "none", torch.device("cpu"))
    assert mask is None and tokens == 18
    lengths = providers.make_batch(config, 256, 32, "heavy", torch.device("cpu"), seed=3)[1].sum(1)
    assert lengths.min() >= 8 and lengths.max() <= 32 and lengths.float().mean() < 24  # heavy: uniform in [8, L]


def test_quantiles_stay_within_the_rounds():
    value, (p20, p50, p80) = timing.summary_of([300.0, 100.0, 200.0])
    assert value == p20 == 140.0 and p50 == 200.0 and 100.0 <= p20 < 200.0 < p80 <= 300.0
    # the headline is the 20th percentile: interruptions, which only add time, move it least
    assert timing.headline([10.0] * 7 + [20.0] * 3) == 10.0
    assert timing.headline([7.0]) == 7.0 and timing.headline([1.0, 2.0]) == 1.2


FAULTS_SCRIPT = """
import ctypes, resource, sys, torch
from convbert_fast.bench.timing import fix_malloc_thresholds
if sys.argv[1] == "fixed":
    assert fix_malloc_thresholds().startswith("glibc malloc, thresholds fixed")
else:  # "mmap": every block of 1 MiB or more comes fresh from the kernel and goes back when freed
    assert ctypes.CDLL(None).mallopt(-3, 2**20)  # M_MMAP_THRESHOLD
def step():  # three 8 MiB buffers alive together, written, then freed: a step's activations
    buffers = [torch.ones(2 * 2**20) for _ in range(3)]
    del buffers
for _ in range(5):  # the heap settles (it grew over the first three steps on the AMD EPYC)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")
def test_fixed_malloc_thresholds_stop_the_page_faults_of_repeated_steps():
    """With the bench's thresholds a step's buffers come from the heap and stay there: repeated steps fault in
    fewer pages than one step writes. Where blocks come from the kernel instead (mmap; glibc's moving thresholds do
    so for some blocks, depending on the process's history), every step faults its pages in again. 20 steps, each
    writing 6144 pages: 0 faults fixed, 122940 mmapped (AMD EPYC, both torch versions of CI); glibc's defaults
    gave 8163 to 83336 on the Xeon and 0 on the EPYC, so they are not asserted."""
    step_pages = 3 * 8 * 2**20 // resource.getpagesize()

    def faults(mode):
        result = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True,
                                timeout=300, env=child_env())  # fmt: skip
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    assert faults("fixed") < step_pages  # fewer than a single step's pages, in 20 steps
    assert faults("mmap") > 10 * step_pages  # (so the test can fail: the count sees pages faulted in again)


def test_cpu_peak_counts_what_a_step_allocates():
    keep = []

    def step():  # 4 MiB and 2 MiB alive together, then 8 MiB after both are freed: the peak is 8 MiB
        a, b = torch.empty(2**20), torch.empty(2**19)
        del a, b
        keep.append(torch.empty(2**21))

    assert timing.cpu_peak_bytes(step) == 8 * 2**20


@pytest.mark.timeout(300)  # several child processes, each importing torch and transformers: 40 s loaded
def test_bench_rejects_unknown_provider_config_and_device():
    result = bench("--providers", "transformers,fastest")
    assert (
        result.returncode == 2
        and "unknown provider(s) ['fastest']; valid: transformers, transformers-compile" in result.stderr
    )
    result = bench("--config", "large")
    assert result.returncode == 2 and "invalid choice: 'large'" in result.stderr
    result = bench("--seq-len", "16,x")
    assert result.returncode == 2 and "'16,x' is not a comma-separated list of integers" in result.stderr
    result = bench("--check")
    assert result.returncode == 2 and "--readme and --check go with --markdown RECORD..." in result.stderr
    assert result.stderr.count("\n") == 1  # one line: no usage, no traceback
    if not torch.cuda.is_available():
        result = bench("--device", "cuda")
        assert result.returncode == 2 and "--device 'cuda' is not available here; valid: cpu" in result.stderr


def _bad_files(tmp_path) -> dict[str, str]:
    (tmp_path / "not.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    return {"tmp": str(tmp_path), "record": str(next((ROOT / "benchmarks" / "results").glob("*bench.json")))}


BAD_BENCH_INPUT = {
    "missing record": (["--markdown", "/nonexistent.json"], "--markdown record /nonexistent.json does not exist"),
    "directory as record": (["--markdown", "{tmp}"], "--markdown record {tmp} is a directory, not a file"),
    "record not JSON": (["--markdown", "{tmp}/not.json"], "--markdown record {tmp}/not.json is not JSON: "),
    "JSON not a record": (["--markdown", "{tmp}/list.json"], "is neither a bench record nor a breakdown record"),
    "README missing": (["--markdown", "{record}", "--readme", "{tmp}/README.md"], "--readme {tmp}/README.md does not"),
    "missing choose record": (["--choose", "/nonexistent.json"], "--choose record /nonexistent.json does not exist"),
    "choose record not a benchmark JSON": (["--choose", "{tmp}/list.json"], "is not a pytest-benchmark JSON"),
    # checked before anything is measured: one line, no progress bar, and at once
    "record in a missing directory": (
        ["--json", "/no/such/dir/x.json"],
        "--json /no/such/dir/x.json: the directory /no/such/dir does not exist",
    ),
    "plot onto a directory": (["--plot", "{tmp}"], "--plot {tmp} is a directory, not a file"),
    "length 0": (["--seq-len", "0"], "--seq-len: every length must be at least 1, got [0]"),
    "negative warm-up": (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
    "no layers": (["--layers", "0"], "--layers must be at least 1"),
    "no rounds": (["--repeats", "0"], "--repeats must be at least 1"),
    "no time": (["--time-budget", "0"], "--time-budget must be positive, got 0.0"),
    "unknown dtype": (["--dtype", "fp32,fp8"], "argument --dtype: 'fp32,fp8': each of fp32, bf16, fp16, by commas"),
}


@pytest.mark.parametrize("case", list(BAD_BENCH_INPUT))
def test_bench_bad_input_is_one_line_and_exit_status_2(case, tmp_path, capsys):
    """A file or a number the command cannot use: one line on stderr, exit status 2, before any work (no progress
    bar, no table), never a traceback."""
    fill = _bad_files(tmp_path)
    extra, message = BAD_BENCH_INPUT[case]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *(a.format(**fill) for a in extra)])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.startswith("python -m convbert_fast bench: error: ") and err.count("\n") == 1, err
    assert message.format(**fill) in err, err


def test_copy_bandwidth_is_a_real_copy():
    """The copy reads written memory larger than the caches: a DRAM figure (GB/s for every machine this runs on), the
    same on a second measurement within what a loaded machine's swings allow."""
    cpu = torch.device("cpu")
    assert timing.copy_bytes(cpu) >= 256 * 2**20
    first, second = timing.copy_bandwidth(cpu) / 1e9, timing.copy_bandwidth(cpu) / 1e9
    assert 0.2 < first < 2000 and 0.2 < second < 2000, (first, second)
    assert 1 / 4 < first / second < 4, (first, second)


def test_ratio_standard_error_shrinks_with_rounds_as_the_quantile_s_does():
    """The bootstrap standard error of a ratio of 20th percentiles: zero for steady times, and for noisy ones close
    to the normal theory's (a p-quantile's SE is sqrt(p (1 - p)) / phi(z_p) sigma / sqrt(n), 1.4287 sigma / sqrt(n)
    at p = 0.2), falling as 1 / sqrt(rounds)."""
    import random

    steady = timing.ratio_standard_errors({"a": [10.0] * 8, "b": [5.0] * 8}, [("a", "b")])
    assert steady == {("a", "b"): 0.0}
    draw = random.Random(1)
    for rounds in (10, 40):
        times = {"a": [draw.gauss(200, 4) for _ in range(rounds)], "b": [draw.gauss(100, 2) for _ in range(rounds)]}
        se = timing.ratio_standard_errors(times, [("a", "b")], resamples=400)["a", "b"]
        theory = 2 * math.sqrt(2) * 1.4287 * 0.02 / math.sqrt(rounds)  # ratio 2, 2% noise on each series
        assert theory / 2 < se < theory * 2, (rounds, se, theory)


def test_gemm_rate_size_keeps_an_emulated_dtype_short():
    """The CPU's GEMM rate is taken at 2048 where a call takes at most GEMM_CALL_S, smaller where a dtype is
    emulated (a test bench in bf16 on an AVX2 host spent minutes on 2048-size GEMMs), never below 512."""
    limit_ms = timing.GEMM_CALL_S * 1e3
    assert timing.cpu_gemm_size(limit_ms / 64) == 2048  # 2048^3 is 64 times 512^3
    assert timing.cpu_gemm_size(limit_ms / 64 * 1.01) == 1024
    assert timing.cpu_gemm_size(limit_ms / 8 * 1.01) == 512
    assert timing.cpu_gemm_size(10 * limit_ms) == 512


def test_budget_shares_follow_the_cost_of_a_round():
    """Each batch gets the time left in proportion to its round's cost, so that cheap and costly batches take about
    the same rounds; what a batch overspends comes out of the later ones in proportion too. Where the batches'
    minimum times are known, those are set aside first, so that the last batch's minimum is not spent before it."""
    costs = [1.0, 1.0, 2.0, 2.0]
    assert record.budget_share(60.0, costs, 0) == pytest.approx(10.0)
    assert record.budget_share(50.0, costs, 1) == pytest.approx(10.0)
    assert record.budget_share(40.0, costs, 2) == pytest.approx(20.0)
    assert record.budget_share(12.0, costs, 3) == pytest.approx(12.0)  # the last takes what is left
    assert record.budget_share(-5.0, costs, 3) == 0.0  # overspent: the minimum rounds, no negative budget
    # each batch's minimum known (from the last batch's clock): set aside first, then the rest shared so
    assert record.budget_share(60.0, costs, 2, [10.0, 20.0]) == pytest.approx(10.0 + 30.0 * 2.0 / 4.0)
    assert record.budget_share(20.0, costs, 2, [10.0, 20.0]) == pytest.approx(10.0)  # short: its minimum


def test_a_batch_that_cannot_finish_its_minimum_rounds_in_the_budget_is_not_measured(tmp_path, capsys):
    """--time-budget holds for the whole run: the first batch always runs (nothing says yet what one takes here);
    a later one is started only if its minimum of rounds fits in what is left, else every provider of it is
    recorded as not measured, with why, and the run says so. With --repeats the rounds are fixed: no budget."""
    record_path = tmp_path / "bench.json"
    args = ["bench", "--config", "small", "--layers", "1", "--batch-size", "1", "--seq-len", "8,16", "--no-pad",
            "--warmup", "0", "--providers", "transformers,cpp", "--json", str(record_path)]  # fmt: skip
    assert cli.main([*args, "--time-budget", "0.001"]) == 0  # spent before the first batch begins
    out = capsys.readouterr().out
    record = json.loads(record_path.read_text())
    assert record["complete"] is True
    first, second = ([m for m in record["measurements"] if m["seq_len"] == n] for n in (8, 16))
    assert [m["skipped"] for m in first] == [None, None] and {m["rounds"] for m in first} == {providers.MIN_ROUNDS}
    for m in second:
        assert m["skipped"].startswith("not measured: 0 s of the 0 s --time-budget were left, and this batch takes "
                                       f"about "), m["skipped"]  # fmt: skip
        assert m["skipped"].endswith(f" s at {providers.MIN_ROUNDS} rounds") and m["train_step_ms"] is None
    assert "WARNING: 1 of 2 batches not measured within --time-budget 0 s: give it more to measure them" in out
    assert cli.main([*args, "--time-budget", "0.001", "--repeats", "1"]) == 0
    assert all(m["skipped"] is None for m in json.loads(record_path.read_text())["measurements"])


def test_a_batch_s_minimum_time_follows_the_last_batch():
    """setup + MIN_ROUNDS rounds of the last batch, scaled up (never down) by the ratio of the batches' costs."""
    last = {"setup_s": 10.0, "round_s": 2.0, "cost": 1.0}
    assert record.batch_minimum_s(last, 1.0) == pytest.approx(10.0 + providers.MIN_ROUNDS * 2.0)
    assert record.batch_minimum_s(last, 2.0) == pytest.approx(2 * (10.0 + providers.MIN_ROUNDS * 2.0))
    assert record.batch_minimum_s(last, 0.5) == pytest.approx(10.0 + providers.MIN_ROUNDS * 2.0)  # compiles stay


def test_a_call_after_a_thread_pool_change_follows_an_untimed_one(monkeypatch):
    """Where the thread pool changes (ONNX Runtime's sessions, torch's) the rounds wait for the last pool's threads
    to stop spinning, then call the provider once untimed, so that no provider's timed call is the first after an
    idle wait (which only some providers' calls were, always the same ones). Within one pool, no wait and no
    extra call."""
    from argparse import Namespace

    from tqdm import tqdm

    config = named_config("small", num_hidden_layers=1, max_position_embeddings=64, vocab_size=512)
    models = providers.build_models(config, torch.device("cpu"), torch.float32)
    events = []
    original_time, original_init = providers.ProviderRun.time, providers.ProviderRun.__init__

    def logged_time(self, phase, record=True):
        events.append((self.provider, phase, "timed" if record else "untimed"))
        return original_time(self, phase, record)

    monkeypatch.setattr(providers.ProviderRun, "time", logged_time)
    monkeypatch.setattr(providers.time, "sleep", lambda s: events.append(("sleep", s)))

    def rounds(pools):
        def init(self, provider, *args):
            original_init(self, provider, *args)
            self.thread_pool = pools[provider]

        monkeypatch.setattr(providers.ProviderRun, "__init__", init)
        events.clear()
        with tqdm(disable=True) as progress:
            providers.measure_batch(["transformers", "cpp"], models, Namespace(batch_size=1, warmup=0, repeats=2),
                                    8, "none", torch.device("cpu"), "fp32", 1e9, None, progress)  # fmt: skip
        return events

    settle = ("sleep", providers.THREAD_POOL_SETTLE_S)
    # one pool: no wait, no untimed call
    assert rounds({"transformers": "torch", "cpp": "torch"}) == [
        ("transformers", "forward", "timed"),
        ("transformers", "train_step", "timed"), ("cpp", "forward", "timed"), ("cpp", "train_step", "timed"),
        ("cpp", "forward", "timed"), ("cpp", "train_step", "timed"),
        ("transformers", "forward", "timed"), ("transformers", "train_step", "timed"),
    ]  # fmt: skip
    # a pool each: every turn that follows the other provider's waits, then calls once untimed (the first follows
    # cpp's warm-up; the order rotates: cpp ends the first round and begins the second)
    def turn(provider, settles):
        return [settle, (provider, "forward", "untimed")] * settles + [(provider, "forward", "timed"),
                                                                       (provider, "train_step", "timed")]  # fmt: skip

    assert rounds({"transformers": "torch", "cpp": "other"}) == (
        turn("transformers", True) + turn("cpp", True) + turn("cpp", False) + turn("transformers", True)
    )


def test_adaptive_rounds_stop_at_the_target_the_budget_or_the_cap(monkeypatch):
    """Without --repeats a batch takes at least MIN_ROUNDS rounds, then more until every ratio's standard error is
    at most RATIO_SE_TARGET, or its time budget is spent, or MAX_ROUNDS; each measurement says how many it took
    and each ratio's error."""
    from argparse import Namespace

    from tqdm import tqdm

    config = named_config("small", num_hidden_layers=1, max_position_embeddings=64, vocab_size=512)
    models = providers.build_models(config, torch.device("cpu"), torch.float32)
    args = Namespace(batch_size=1, warmup=0, repeats=None)

    def rounds_taken(budget_s):
        clock = {}
        with tqdm(disable=True) as progress:
            measured = providers.measure_batch(["transformers", "cpp"], models, args, 8, "none", torch.device("cpu"),
                                               "fp32", 1e9, None, progress, budget_s, clock)  # fmt: skip
        assert [m.skipped for m in measured] == [None, None]
        assert set(clock) == {"setup_s", "round_s", "after_s"} and min(clock.values()) > 0, clock
        assert set(measured[1].ratio_se) == {"forward vs transformers", "train_step vs transformers"}
        assert measured[0].rounds == measured[1].rounds  # the providers take turns: the same rounds
        return measured[0].rounds, measured[1].ratio_se

    # the budget spent at once: the minimum, whatever the errors
    monkeypatch.setattr(providers, "RATIO_SE_TARGET", 0.0)
    assert rounds_taken(0.0)[0] == providers.MIN_ROUNDS
    # a target every ratio meets: the minimum, however long the budget
    monkeypatch.setattr(providers, "RATIO_SE_TARGET", 1e9)
    assert rounds_taken(600.0)[0] == providers.MIN_ROUNDS
    # an unreachable target and a long budget: the cap
    monkeypatch.setattr(providers, "RATIO_SE_TARGET", 0.0)
    monkeypatch.setattr(providers, "MAX_ROUNDS", providers.MIN_ROUNDS + 3)
    rounds, errors = rounds_taken(600.0)
    assert rounds == providers.MIN_ROUNDS + 3 and all(se > 0 for se in errors.values())
    # the README's sentence says how many rounds a record's times took, which statistic and by which rule
    record = {"settings": {"repeats": None}, "rounds_rule": "adaptive: ...", "headline_quantile": 0.2,
              "measurements": [{"rounds": 5}, {"rounds": 8}]}  # fmt: skip
    assert report._rounds(record) == "20th percentiles of 5 to 8 rounds (adaptive: ...)"
    assert report._rounds({**record, "headline_quantile": None}) == "medians of 5 to 8 rounds (adaptive: ...)"


def test_forwards_run_on_a_frozen_copy(monkeypatch):
    """The training steps move the shared models' weights; the forwards run on copies that no step moves (as the
    deploy artifacts and a served model do)."""
    from argparse import Namespace

    from tqdm import tqdm

    config = named_config("small", num_hidden_layers=1, max_position_embeddings=64, vocab_size=512)
    models = providers.build_models(config, torch.device("cpu"), torch.float32)
    start = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    forward_models, moved, calls = [], [], []
    original_forward, original_step = providers.ProviderRun.forward, providers.ProviderRun.train_step

    def forward(self):
        forward_models.append(self.inference_model)
        assert not self.inference_model.training and not any(p.requires_grad for p in self.inference_model.parameters())
        calls.append(self.provider)
        return original_forward(self)

    def train_step(self):
        original_step(self)
        moved.append(any(not torch.equal(p, start[models.index(self.model)][k]) for k, p in self.model.state_dict().items()))

    monkeypatch.setattr(providers.ProviderRun, "forward", forward)
    monkeypatch.setattr(providers.ProviderRun, "train_step", train_step)
    grad_modes = []  # the shared models run only the training steps' forwards, with autograd on
    inference_modes = []  # the copies' forwards run under inference_mode, as a server runs them
    for model in models:  # (the copies inherit the hook)
        model.register_forward_pre_hook(
            lambda module, args: grad_modes.append(torch.is_grad_enabled())
            if module in models
            else inference_modes.append(torch.is_inference_mode_enabled())
        )
    args = Namespace(batch_size=1, warmup=0, repeats=2)
    with tqdm(disable=True) as progress:
        measured = providers.measure_batch(["transformers", "cpp"], models, args, 8, "none", torch.device("cpu"),
                                           "fp32", 1e9, None, progress)  # fmt: skip
    assert [m.skipped for m in measured] == [None, None]
    assert all(moved)  # the steps did move the shared weights...
    assert grad_modes and all(grad_modes)  # ...which no inference forward ran on
    assert inference_modes and all(inference_modes)
    assert all(m not in models for m in forward_models)
    assert len({id(m) for m in forward_models}) == 3  # a copy each: the reference, transformers and cpp
    for m in {id(m): m for m in forward_models}.values():  # and the forwards' copies still hold the start's weights
        state = start[0] if type(m) is type(models[0]) else start[1]
        assert all(torch.equal(p, state[k]) for k, p in m.state_dict().items())
    timed = calls[3:]  # after the reference's and each provider's output check: one call a round
    assert timed.count("cpp") == timed.count("transformers") == 2


def test_readme_tables_are_the_committed_records():
    """CI's check: the README's performance tables are what `bench --markdown` writes from benchmarks/results."""
    records = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "results").glob("*.json"))
    assert records
    result = bench("--markdown", *records, "--readme", "README.md", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)  # four child processes, each importing torch and transformers
def test_markdown_check_fails_on_an_edited_table(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the records named as the CLI below names them
    records = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "results").glob("*.json"))
    blocks = report.markdown_blocks(records)
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"intro\n<!-- bench:{name} -->\nstale\n<!-- /bench:{name} -->\n" for name in blocks))
    assert bench("--markdown", *records, "--readme", str(readme), "--check").returncode == 1
    assert bench("--markdown", *records, "--readme", str(readme)).returncode == 0  # rewrites the blocks
    text = readme.read_text()
    assert "stale" not in text and bench("--markdown", *records, "--readme", str(readme), "--check").returncode == 0
    for name, body in blocks.items():
        assert f"<!-- bench:{name} -->\n{body}<!-- /bench:{name} -->" in text
    with pytest.raises(ValueError, match="generated blocks"):
        report.render_readme("no blocks here", blocks)


@pytest.mark.timeout(300)  # profiles three models in a child process: 24 s loaded
def test_breakdown_reports_a_real_round_for_each_model(tmp_path):
    """benchmarks/breakdown.py (the README's "Where the time goes") runs and accounts for the whole step."""
    record_path = tmp_path / "breakdown.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/breakdown.py", "--device", "cpu", "--layers", "1", "--batch-size", "1",
         "--seq-len", "16", "--rounds", "3", "--json", str(record_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=child_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "profiler_start" not in result.stderr and "USDT" not in result.stderr, result.stderr  # kineto silenced
    record = json.loads(record_path.read_text())
    assert set(record["breakdown_ms"]) == {"transformers", "ours (eager)", "ours (auto)"}
    for name, categories in record["breakdown_ms"].items():
        assert categories["GEMM (linear, matmul)"] > 0
        rounds = record["rounds_ms"][name]
        assert len(rounds) == 3 and categories in rounds  # one round as it happened, the median by total
        totals = sorted(sum(r.values()) for r in rounds)
        assert math.isclose(sum(categories.values()), totals[1])
    assert record["breakdown_ms"]["ours (auto)"].get("span conv", 0) > 0  # our op is counted as the span conv
    assert "| total |" in result.stdout and record["device"] and record["date"] and "git_dirty" in record


@pytest.mark.timeout(600)  # two ONNX exports and the op summary in the run: 60 s on a loaded 2-core Xeon
def test_bench_times_the_deploy_providers_inference_only(tmp_path, capsys):
    """The ONNX Runtime providers; `aoti` runs the same way, its package made and loaded by convbert_fast.deploy as
    `export --format aoti` does (tests/test_deploy.py), a compile this test leaves out."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    record_path = tmp_path / "bench.json"
    deployed = ("onnxruntime-ours", "onnxruntime-transformers")
    args = ["bench", "--config", "small", "--layers", "1", "--batch-size", "2", "--seq-len", "16", "--repeats", "1",
            "--warmup", "0", "--padding", "none,half", "--providers", ",".join(("transformers", "cpp") + deployed),
            "--json", str(record_path)]  # fmt: skip
    assert cli.main(args) == 0
    record = json.loads(record_path.read_text())
    measured = {(m["provider"], m["padded"]): m for m in record["measurements"]}
    assert len(measured) == 8 and all(m["skipped"] is None for m in measured.values()), measured
    for (provider, _), m in measured.items():
        assert m["forward_ms"] > 0 and m["inference_tokens_per_s"] > 0
        if provider in deployed:  # a forward only: no training step, no memory row
            assert m["train_step_ms"] is None and m["peak_memory_mb"] is None and m["train_tokens_per_s"] is None
        else:
            assert m["train_step_ms"] > 0 and m["peak_memory_mb"] > 0
    assert re.search(r"16 +none onnxruntime-ours +[\d.]+ +- +-", capsys.readouterr().out)  # no training cells: "-"
    table = report.deploy_markdown(record, "bench.json")
    for label in ("ours, ONNX Runtime", "transformers, ONNX Runtime", "ours, `cpp`", "transformers"):
        assert table.count(f"| {label} | ") == 2  # full and padded rows
    assert "| 16 | all L | transformers, ONNX Runtime | " in table and " 1.00x |" in table


def test_deploy_providers_say_why_they_cannot_run_and_refuse_a_wrong_artifact(tmp_path):
    from convbert_fast.bench import deploy

    cpu = torch.device("cpu")
    assert deploy.deploy_problem("aoti", cpu, torch.bfloat16) == "deploy artifacts are exported in fp32"
    assert "measured on the CPU" in deploy.deploy_problem("onnxruntime-ours", torch.device("cuda"), None)
    assert deploy.deploy_problem("cpp", cpu, torch.bfloat16) is None  # not a deploy provider
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    import convbert_fast as cf

    model = cf.ConvBertModel(named_config("small", num_hidden_layers=1, max_position_embeddings=64))
    artifact = deploy.Artifact("onnxruntime-ours", model, tmp_path)
    ids = torch.randint(5, 100, (2, 9))
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    artifact.check("onnxruntime-ours", inputs)
    with torch.no_grad():
        artifact.reference.model.encoder.layer[0].output.LayerNorm.bias += 0.01  # the model moves, not the artifact
    with pytest.raises(AssertionError, match="onnxruntime-ours: the artifact differs from its model by"):
        artifact.check("onnxruntime-ours", inputs)
