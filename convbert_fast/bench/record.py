"""`python -m convbert_fast bench`: the run and its record. Our ConvBERT against transformers' eager model and
torch.compile of it, side by side in one run, written as a JSON record (device, versions, date, commit, settings,
every measurement and a summary) and printed as a table (report.py), with a plot.

The model measured is the encoder (ConvBertModel) with a scalar loss on its output: the part our kernels
change. A training step is forward + backward + fused AdamW step (every provider's); inference is a forward under
torch.inference_mode in eval mode.
At each batch (L tokens a row, and padded batches of the same L: --padding) the providers are timed in rounds,
one call each per round, and each reports the 20th percentile of its rounds (timing.HEADLINE_QUANTILE): a drift
in the machine's speed then falls on every provider alike. Compiled providers get fresh graphs per batch, and dynamo's counts say they ran them;
each provider's memory is measured alone.
"""

from __future__ import annotations

import datetime
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import inference_weights
from .providers import (
    BASELINE,
    COMPILE_BASELINE,
    DTYPES,
    MAX_ROUNDS,
    MIN_ROUNDS,
    ORT_BASELINE,
    RATIO_SE_TARGET,
    Measurement,
    build_models,
    measure_batch,
    ops_summary,
    train_step_flops,
)
from .report import _ratio, plot, provider_label, table
from .timing import (
    CPU_MEMORY_TOOL,
    CUDA_MEMORY_TOOL,
    HEADLINE_QUANTILE,
    copy_bandwidth,
    fix_malloc_thresholds,
    gemm_rate,
)

OPTIMIZER = "torch.optim.AdamW(fused=True)"  # every provider's, as `train` steps (train.adamw)
OVER_BUDGET = "not measured"  # how a batch that --time-budget leaves out is skipped (`run`)
OPS_REPEATS = 10  # the op summary's rounds when the model's are adaptive (its ratios are 1.1x to 26x: see README)


def budget_share(left_s: float, costs: list[float], i: int, minimums: list[float] | None = None) -> float:
    """Batch i's seconds of the `left_s` left to it and the batches after it: in proportion to what a round of
    each costs (a training step's FLOPs at the GEMM rate of its dtype), so that every batch gets about the same
    rounds (an equal share of what was left gave L=128 22 rounds and L=256 10, 8 and 5). `minimums`, where known
    (batch_minimum_s of batches i, i+1, ...): each batch's minimum of rounds is set aside first and the rest shared
    so, lest the batches before the last take what its minimum needs."""
    if not minimums:
        return max(0.0, left_s) * costs[i] / sum(costs[i:])
    spare = max(0.0, left_s - sum(minimums))
    return minimums[0] + spare * costs[i] / sum(costs[i:])


def batch_minimum_s(last: dict, cost_ratio: float, rounds: int = MIN_ROUNDS) -> float:
    """About how long a batch takes at `rounds` rounds, from the last batch's clock (measure_batch's `setup_s` and
    `round_s`) and the ratio of their costs: the last one's setup and rounds, scaled up when this batch costs more
    (its warm-up, memory measurement and rounds grow with it; its compiles do not shrink when it costs less)."""
    return (last["setup_s"] + rounds * last["round_s"]) * max(1.0, cost_ratio)


def versions(device) -> dict:
    """env.versions(), and the driver's version on a GPU (nvidia-smi's; None where it cannot be asked)."""
    from ..env import versions as env_versions

    driver = None
    if device.type == "cuda":
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip() or None  # fmt: skip
        except OSError:
            pass
    return {**env_versions(), "driver": driver}


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from ..env import cpu_name

    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def provenance() -> dict:
    """The commit measured and whether the tree had uncommitted changes to tracked files other than the records
    under benchmarks/results/ (outputs, not code: a run after another that rewrote its record measures the same
    code) (None: not a git checkout)."""

    def git(*args):
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent)
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    records = ":(exclude,top)benchmarks/results"
    status = git("status", "--porcelain", "--untracked-files=no", "--", ":/", records) if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


# summary keys' prefix per padding: full rows none, padded rows (lengths in [L/2, L]) `padded_`, heavy `heavy_`
SUMMARY_PREFIX = {"none": "", "half": "padded_", "heavy": "heavy_"}


def summarize(measurements: list[Measurement], provider_ours: str, dtypes: list[str]) -> dict:
    """Headline figures at the longest sequence length measured, per padding (SUMMARY_PREFIX), for our
    fastest-by-default provider, in the first dtype; the other dtypes' under their name (`bf16_...`). For the
    padding-invariant mode (`cpp-unpadded`), its speed-ups over transformers and over the same backend in the
    default mode on the same batch (`unpadded_..._vs_ours`); against ONNX Runtime on transformers' graph,
    `inference_vs_onnxruntime`."""
    summary = {}
    for dtype in dtypes:
        figures = _summarize_dtype([m for m in measurements if m.dtype == dtype], provider_ours)
        prefix = "" if dtype == dtypes[0] else f"{dtype}_"
        summary |= {prefix + key: value for key, value in figures.items()}
    return summary


def _summarize_dtype(measurements: list[Measurement], provider_ours: str) -> dict:
    done = [m for m in measurements if m.skipped is None]
    if not done:
        return {}
    seq_len = max(m.seq_len for m in done)
    summary = {"seq_len": seq_len, "provider": provider_ours, "dtype": done[0].dtype}
    for padding, prefix in SUMMARY_PREFIX.items():
        at = {m.provider: m for m in done if m.seq_len == seq_len and m.padding == padding}
        if not at:
            continue
        ours, base, compiled = at.get(provider_ours), at.get(BASELINE), at.get(COMPILE_BASELINE)
        summary |= {
            prefix + "train_step_vs_eager": _ratio(base and base.train_step_ms, ours and ours.train_step_ms),
            prefix + "train_step_vs_compile": _ratio(compiled and compiled.train_step_ms, ours and ours.train_step_ms),
            prefix + "inference_vs_eager": _ratio(base and base.forward_ms, ours and ours.forward_ms),
            prefix + "peak_memory_vs_eager": _ratio(ours and ours.peak_memory_mb, base and base.peak_memory_mb),
        }
        unpadded, default = at.get("cpp-unpadded"), at.get("cpp")
        if unpadded is not None:
            summary |= {
                prefix + "unpadded_train_step_vs_eager": _ratio(base and base.train_step_ms, unpadded.train_step_ms),
                prefix + "unpadded_inference_vs_eager": _ratio(base and base.forward_ms, unpadded.forward_ms),
                prefix + "unpadded_train_step_vs_ours": _ratio(default and default.train_step_ms, unpadded.train_step_ms),
                prefix + "unpadded_inference_vs_ours": _ratio(default and default.forward_ms, unpadded.forward_ms),
            }
        if ORT_BASELINE in at:
            ort = at[ORT_BASELINE]
            summary[prefix + "inference_vs_onnxruntime"] = _ratio(ort.forward_ms, ours and ours.forward_ms)
    return summary


def run(args) -> int:
    """Measures, printing the table at the end. The record (--json) is written after the op summary and again
    after every batch, marked `complete: false` until the last: a run stopped by a time limit (SIGINT, as
    `timeout --signal=INT` sends) keeps what it measured, says where it stopped, and exits 130."""
    from tqdm import tqdm

    from ..configs import named_config
    from ..env import cpu_isa

    # A shell without job control starts a background command (`cmd &`, `nohup ... &`) with SIGINT ignored, and
    # Python then never raises KeyboardInterrupt: a time limit's SIGINT would be lost and the run go on to the end.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.perf_counter()  # --time-budget counts from here (adaptive rounds)
    device = torch.device(args.device)
    allocator = fix_malloc_thresholds() if device.type == "cpu" else None  # before the run allocates anything
    began = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **provenance()}
    # a position table long enough for every length asked for (speed does not depend on its size)
    config = named_config(args.config, num_hidden_layers=args.layers, max_position_embeddings=max(512, *args.seq_len))
    dtypes = args.dtype  # fp32 weights with autocast for bf16/fp16, as training runs
    providers = args.providers
    ours = next((p for p in ("compile", "cpp", "triton", "eager") if p in providers), providers[-1])
    batches = [(dtype, seq_len, padding) for dtype in dtypes for seq_len in args.seq_len for padding in args.padding]
    title = (
        f"ConvBertModel {args.config}, {args.layers} layers, batch {args.batch_size}, {','.join(dtypes)}, "
        f"{device_name(device)}"
    )
    memory_tool = CUDA_MEMORY_TOOL if device.type == "cuda" else CPU_MEMORY_TOOL
    measurements: list[Measurement] = []
    rounds_rule = (
        f"{args.repeats} per batch" if args.repeats else f"adaptive: at least {MIN_ROUNDS}, then until every ratio's "
        f"bootstrap standard error is <= {RATIO_SE_TARGET} or the batch's share of {args.time_budget:.0f} s is spent "
        f"(at most {MAX_ROUNDS}; a batch that could not take {MIN_ROUNDS} in what is left is not measured)"
    ) + "; the forwards run on a frozen copy of each model (eval mode, weights no step moves)"  # fmt: skip
    record = {
        "device": device_name(device),
        "cpu_isa": cpu_isa() if device.type == "cpu" else None,
        "versions": versions(device),
        **began,  # the code that ran: the tree when the run began
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "command", "markdown", "readme",
                                                                       "check", "choose")},  # fmt: skip
        "rounds_rule": rounds_rule,
        "memory_tool": memory_tool,
        "cpu_allocator": allocator,  # the glibc malloc settings the run measured under (timing.fix_malloc_thresholds)
        "cpu_inference_gemm": None,  # the packed GEMM's library per fp32 inference shape (inference_weights.pack)
        "optimizer": OPTIMIZER,
        "headline_quantile": HEADLINE_QUANTILE,  # every time is this quantile of its rounds
        "complete": False,
        "stopped": None,  # why a run that is not complete ended early
        "ops_repeats": args.repeats or OPS_REPEATS,
        "copy_bandwidth_gbps": None,  # a copy of written memory larger than the caches, read + write counted
        "gemm_rate_flops": {},  # per dtype
        "measurements": [],
        "ops": [],  # per dtype
        "summary": {},
        "budget": [],  # per batch, adaptive rounds: the seconds left, its share, its estimated minimum, its clock
    }

    def save():
        summary = summarize(measurements, ours, dtypes)
        if record["ops"]:
            span_conv = record["ops"][0]["dynamic_span_conv"]
            summary.update(span_conv_vs_eager=span_conv["vs_eager"],
                           span_conv_bandwidth_fraction=span_conv["bandwidth_fraction"])  # fmt: skip
        record["measurements"] = [asdict(m) for m in measurements]
        if device.type == "cpu":  # which library's packed GEMM served each fp32 inference shape (inference_weights)
            record["cpu_inference_gemm"] = inference_weights.gemm_choices()
        record["summary"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")

    try:
        bandwidth = copy_bandwidth(device)
        record["copy_bandwidth_gbps"] = bandwidth / 1e9
        # the ops first: a minute at most, and the figures the kernels are judged by
        for dtype in dtypes:
            record["ops"].append(ops_summary(device, DTYPES[dtype], args.warmup, record["ops_repeats"], bandwidth))
        save()
        models = build_models(config, device, torch.float32)
        for dtype in dtypes:
            record["gemm_rate_flops"][dtype] = gemm_rate(device, DTYPES[dtype])
        flops = {seq_len: train_step_flops(models[0], args.batch_size, seq_len, device) for seq_len in args.seq_len}
        deadline = started + args.time_budget  # shared out batch by batch
        costs = [flops[seq_len] / record["gemm_rate_flops"][dtype] for dtype, seq_len, _ in batches]
        last: dict = {}  # the last batch's clock (measure_batch)
        with tqdm(total=len(batches) * len(providers), desc="bench", unit="provider") as progress:
            for i, (dtype, seq_len, padding) in enumerate(batches):
                left_s = deadline - time.perf_counter()
                # adaptive rounds keep to the budget: a batch that would not finish its minimum of rounds in what
                # is left is not started (the first always is: nothing says yet what a batch takes here)
                minimums = [batch_minimum_s(last, cost / last["cost"]) for cost in costs[i:]] if last else None
                needed_s = minimums[0] if minimums and not args.repeats else None
                if needed_s is not None and needed_s > left_s:
                    why = (f"{OVER_BUDGET}: {max(left_s, 0):.0f} s of the {args.time_budget:.0f} s --time-budget "
                           f"were left, and this batch takes about {needed_s:.0f} s at {MIN_ROUNDS} rounds")
                    measurements.extend(Measurement(p, seq_len, args.batch_size, padding != "none", padding,
                                                    skipped=why, dtype=dtype) for p in providers)  # fmt: skip
                    progress.update(len(providers))
                    continue
                share_s = budget_share(left_s, costs, i, minimums)
                measurements.extend(measure_batch(providers, models, args, seq_len, padding, device, dtype,
                                                  record["gemm_rate_flops"][dtype], flops[seq_len], progress,
                                                  share_s, last))  # fmt: skip
                last["cost"] = costs[i]
                record["budget"].append({"dtype": dtype, "seq_len": seq_len, "padding": padding,
                                         **{k: round(v, 1) for k, v in dict(left_s=left_s, share_s=share_s,
                                            minimum_s=needed_s or 0.0, setup_s=last["setup_s"],
                                            round_s=last["round_s"]).items()}})  # fmt: skip
                save()
        del models
        record["complete"] = True
    except KeyboardInterrupt:
        done = len({(m.dtype, m.seq_len, m.padding) for m in measurements})
        record["stopped"] = f"interrupted (SIGINT) after {done} of {len(batches)} batches"
        print(f"\nSTOPPED: {record['stopped']}; the record keeps what was measured", file=sys.stderr)
    save()
    print(title)
    print(table(measurements))
    rounds = sorted({m.rounds for m in measurements if m.rounds})
    print(f"(rounds: {rounds_rule}; taken: {', '.join(map(str, rounds)) or 'none'}; padded rows: lengths uniform in "
          f"[L/2, L] (half) or [8, L] (heavy), tokens/s of real tokens; memory: {memory_tool})")  # fmt: skip
    worst = max((se for m in measurements for se in (m.ratio_se or {}).values()), default=None)
    if worst is not None:
        print(f"largest standard error of a ratio above: {worst:.3f}")
    left_out = {(m.dtype, m.seq_len, m.padding) for m in measurements if (m.skipped or "").startswith(OVER_BUDGET)}
    if left_out:
        print(f"WARNING: {len(left_out)} of {len(batches)} batches not measured within --time-budget "
              f"{args.time_budget:.0f} s: give it more to measure them")  # fmt: skip
    for ops in record["ops"]:
        for op in ("dynamic_span_conv", "separable_conv1d", "grouped_linear"):
            print(f"{op} fwd+bwd at base shapes, {ops['dtype']}: {ops[op]['eager_ms']:.1f} ms eager, "
                  f"{ops[op]['ms']:.1f} ms {ops['backend']} ({ops[op]['vs_eager']:.1f}x)")  # fmt: skip
        print(f"span conv, {ops['dtype']}: {100 * ops['dynamic_span_conv']['bandwidth_fraction']:.0f}% of copy "
              f"bandwidth")  # fmt: skip
    if record["copy_bandwidth_gbps"] is not None:
        print(f"copy bandwidth here: {record['copy_bandwidth_gbps']:.1f} GB/s (read + write)")
    for dtype, rate in record["gemm_rate_flops"].items():
        print(f"dense GEMM rate here, {dtype}: {rate / 1e9:.0f} GFLOP/s")
    not_compiled = [provider_label(m) for m in measurements if m.compiled is False]
    if not_compiled:
        print(f"WARNING: {len(not_compiled)} compiled measurement(s) fell back to eager: see `dynamo` in the record")
    if args.json:
        print(f"wrote {args.json}" + ("" if record["complete"] else " (incomplete)"))
    if args.plot and measurements:
        plot(measurements, args.plot, title)
        print(f"wrote {args.plot}")
    return 0 if record["complete"] else 130
