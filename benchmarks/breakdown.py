"""Where the time of a training step goes: transformers' eager ConvBERT beside ours, by kind of work.

    python benchmarks/breakdown.py [--device cpu|cuda] [--dtype fp32|bf16] [--layers 2] [--batch-size 8]
                                   [--seq-len 256] [--json PATH]

Profiles forward+backward steps (after warm-up runs, the models taking turns; per model the round whose total
is the median of --rounds, a step that really ran) of ConvBertModel with the same weights under torch.profiler
(transformers; ours under the `eager` backend, the seed's math; ours under `auto`) and sums each op's self time
into a category (GEMMs, attention, span conv, ...), printing a markdown table in ms and
in shares of the step; the README's "Where the time goes" comes from it. Profiling inflates many small ops more
than a few large ones: read the shares here, and take speed-ups from `python -m convbert_fast bench`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch

import convbert_fast as cf
from convbert_fast.bench.providers import build_models  # (its timing module silences kineto: KINETO_LOG_LEVEL)
from convbert_fast.bench.record import device_name, provenance, versions
from convbert_fast.configs import named_config

# op-name fragments -> category, first match wins (profiler names, forward and autograd backward ops)
CATEGORIES = [
    ("span conv", ("dynamic_span_conv", "im2col", "col2im", "unfold")),
    ("separable conv", ("separable_conv1d", "convolution", "conv1d", "conv_depthwise")),
    ("grouped linear", ("grouped_linear",)),
    ("attention (softmax, SDPA)", ("softmax", "scaled_dot_product", "flash_attention", "efficient_attention")),
    ("GEMM (linear, matmul)", ("addmm", "::mm", "bmm", "baddbmm", "matmul", "linear")),
    ("GELU", ("gelu",)),
    ("LayerNorm", ("layer_norm",)),
    ("copies (cat, transpose, contiguous)", ("copy_", "cat", "clone", "contiguous", "_to_copy")),
    ("elementwise (add, mul, div, dropout)", ("add", "mul", "div", "dropout", "sum", "fill_", "zero_", "where")),
    ("embeddings", ("embedding", "index_select")),
]


def with_backend(name, fn):
    def call():
        with cf.use_backend(name):
            fn()

    return call


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, fragments in CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return category
    return "other"


def step_fn(model, ids, device, autocast_dtype):
    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(ids).last_hidden_state.float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def profile_once(step, device) -> dict[str, float]:
    """ms of self time per category in one profiled step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, acc_events=True) as prof:  # one cycle; no torch 2.11 warning
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0:
            category = categorize(event.key)
            totals[category] = totals.get(category, 0.0) + us / 1e3
    return totals


def profile_interleaved(steps: dict, device, rounds: int) -> dict[str, list[dict[str, float]]]:
    """Each model's step profiled once per round, the models taking turns: per model, every round's
    categories."""
    for step in steps.values():
        step(), step()  # warm-up
    results: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            results[name].append(profile_once(step, device))
    return results


def median_round(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The round whose total is the median (the lower one of an even count): a step that happened, not a sum
    of each category's best over different rounds."""
    ordered = sorted(rounds, key=lambda r: sum(r.values()))
    return ordered[(len(ordered) - 1) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="profiled steps per model, taken in turns")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    began = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **provenance()}
    on_gpu = device.type == "cuda"
    dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    layers, batch = args.layers or (12 if on_gpu else 2), args.batch_size or (32 if on_gpu else 8)
    seq_len = args.seq_len or (512 if on_gpu else 256)
    config = named_config("base", num_hidden_layers=layers)
    theirs, ours = build_models(config, device, torch.float32)
    theirs.train(), ours.train()
    ids = torch.randint(5, config.vocab_size, (batch, seq_len), device=device)
    steps = {"transformers": step_fn(theirs, ids, device, autocast_dtype)}
    for backend in ("eager", "auto"):  # before (the seed's math) and after (fused layers, kernels)
        steps[f"ours ({backend})"] = with_backend(backend, step_fn(ours, ids, device, autocast_dtype))
    all_rounds = profile_interleaved(steps, device, args.rounds)
    results = {name: median_round(rounds) for name, rounds in all_rounds.items()}

    names = list(results)
    categories = sorted({c for r in results.values() for c in r}, key=lambda c: -results[names[0]].get(c, 0.0))
    print(f"training step of ConvBERT-base with {layers} layers, batch {batch} x {seq_len}, {dtype}, {device}")
    print("| " + " | ".join(["work"] + [f"{n} ms" for n in names] + [f"{n} share" for n in names]) + " |")
    print("|" + "---|" * (1 + 2 * len(names)))
    sums = {n: sum(results[n].values()) for n in names}
    for category in categories + ["total"]:
        ms = [sums[n] if category == "total" else results[n].get(category, 0.0) for n in names]
        shares = [f"{100 * m / sums[n]:.0f}%" for m, n in zip(ms, names)]
        print("| " + " | ".join([category] + [f"{m:.1f}" for m in ms] + shares) + " |")
    if args.json:
        record = dict(device=device_name(device), versions=versions(device), **began,
                      layers=layers, batch_size=batch, seq_len=seq_len, dtype=dtype, rounds=args.rounds,
                      breakdown_ms=results, rounds_ms=all_rounds)  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
