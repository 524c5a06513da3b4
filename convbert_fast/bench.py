"""`python -m convbert_fast bench`: our ConvBERT against transformers' eager model and torch.compile of it,
side by side in one run, as a table, a JSON record and a plot.

The model measured is the encoder (ConvBertModel) with a scalar loss on its output: the part our kernels
change. A training step is forward + backward + AdamW step; inference is a forward under no_grad in eval mode.
At each length the providers are timed in rounds, one call each per round, and each reports the median of its
rounds: a drift in the machine's speed then falls on every provider alike.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PROVIDERS = {
    "transformers": "transformers' eager ConvBertModel",
    "transformers-compile": "torch.compile of transformers' model",
    "eager": "convbert_fast, backend eager (the transformers math)",
    "cpp": "convbert_fast, backend cpp",
    "triton": "convbert_fast, backend triton",
    "compile": "torch.compile of convbert_fast (backend auto)",
}
BASELINE, COMPILE_BASELINE = "transformers", "transformers-compile"


@dataclass
class Measurement:
    provider: str
    seq_len: int
    batch_size: int
    skipped: str | None = None  # why it could not run here
    forward_ms: float | None = None
    forward_ms_quantiles: list[float] = field(default_factory=list)  # p20, p50, p80
    train_step_ms: float | None = None
    train_step_ms_quantiles: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None  # training step, CUDA only
    train_tokens_per_s: float | None = None
    inference_tokens_per_s: float | None = None
    train_flops: float | None = None
    gemm_rate_fraction: float | None = None  # model FLOP/s over the GEMM rate measured in the same run


def provider_problem(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device`, or None."""
    import convbert_fast as cf

    if provider in ("eager", "cpp", "triton"):
        status = cf.available_backends()[provider]
        if status != "ok":
            return status
        gap = cf.ops.backend.device_gaps().get((provider, device.type))
        if gap:
            return gap
        if provider == "triton" and device.type == "cpu":
            return "Triton on the CPU runs in its interpreter: not a speed to measure"
    return None


def _timer(device: torch.device):
    """(start, stop) -> milliseconds, with CUDA events on a GPU."""
    if device.type == "cuda":

        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)

    else:

        def measure(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

    return measure


def time_ms(fn, device, warmup: int, repeats: int) -> tuple[float, list[float]]:
    measure = _timer(device)
    for _ in range(warmup):
        measure(fn)
    return summary_of([measure(fn) for _ in range(repeats)])


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one large dense GEMM in `dtype` on `device`, measured now: the fastest of 10 runs (the rate the
    hardware reaches; a median would follow a drifting machine down)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    measure = _timer(device)
    for _ in range(2):
        measure(lambda: a @ b)
    ms = min(measure(lambda: a @ b) for _ in range(10))
    return 2 * n**3 / (ms / 1e3)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large tensor copy (read + write), measured now."""
    src = torch.empty(64 * 2**20 if device.type == "cuda" else 16 * 2**20, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def build_models(config, device, dtype):
    """transformers' model and ours with the same weights."""
    import transformers

    import convbert_fast as cf

    torch.manual_seed(0)
    theirs = transformers.ConvBertModel(config).to(device, dtype)
    ours = cf.ConvBertModel(config).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def train_step_flops(model, batch_size, seq_len, device) -> float:
    """FLOPs of one training step of transformers' eager model (the same math as every provider)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(5, model.config.vocab_size, (batch_size, seq_len), device=device)
    with FlopCounterMode(display=False) as counter:
        model(ids).last_hidden_state.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def summary_of(times: list[float]) -> tuple[float, list[float]]:
    """(median, [p20, p50, p80]) of timings in ms."""
    times = sorted(times)
    quantiles = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), [quantiles[0], statistics.median(times), quantiles[-1]]


class ProviderRun:
    """One provider at one sequence length: its runner (compiled or not), optimizer and inputs, timed one call at
    a time so that `run` can interleave the providers round by round (a machine whose speed drifts then slows
    every provider alike instead of whichever ran during the slow minute)."""

    def __init__(self, provider, models, batch_size, seq_len, device, autocast_dtype):
        theirs, ours = models
        self.provider, self.seq_len, self.batch_size, self.device = provider, seq_len, batch_size, device
        self.model = theirs if provider.startswith("transformers") else ours
        self.backend = {"eager": "eager", "cpp": "cpp", "triton": "triton"}.get(provider, "auto")
        # static shapes: one compilation per sequence length, as a fixed-shape training run would have
        self.runner = torch.compile(self.model, dynamic=False) if provider.endswith("compile") else self.model
        self.ids = torch.randint(5, self.model.config.vocab_size, (batch_size, seq_len), device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.autocast_dtype = autocast_dtype
        self.times: dict[str, list[float]] = {"forward": [], "train_step": []}
        self.peak_memory_mb = None
        self.measure = _timer(device)

    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def forward(self):
        with torch.no_grad(), self._autocast():
            self.runner(self.ids)

    def train_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.runner(self.ids).last_hidden_state.float().square().mean()
        loss.backward()
        self.optimizer.step()

    def time(self, phase: str, record: bool = True) -> None:
        import convbert_fast as cf

        with cf.use_backend(self.backend):
            self.model.train(phase == "train_step")
            if phase == "train_step" and self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            ms = self.measure(getattr(self, phase))
            if phase == "train_step" and self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                self.peak_memory_mb = max(self.peak_memory_mb or 0.0, peak)
        if record:
            self.times[phase].append(ms)

    def result(self, gemm_flops, train_flops) -> Measurement:
        result = Measurement(self.provider, self.seq_len, self.batch_size, peak_memory_mb=self.peak_memory_mb)
        result.forward_ms, result.forward_ms_quantiles = summary_of(self.times["forward"])
        result.train_step_ms, result.train_step_ms_quantiles = summary_of(self.times["train_step"])
        tokens = self.batch_size * self.seq_len
        result.train_tokens_per_s = tokens / (result.train_step_ms / 1e3)
        result.inference_tokens_per_s = tokens / (result.forward_ms / 1e3)
        if train_flops is not None:
            result.train_flops = train_flops
            result.gemm_rate_fraction = train_flops / (result.train_step_ms / 1e3) / gemm_flops
        return result


def failure(error: Exception) -> str:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "out of memory"
    return f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"


def measure_length(providers, models, args, seq_len, device, autocast_dtype, gemm_flops, train_flops, progress):
    """Every provider at one length: warm-up calls, then `repeats` rounds that time each provider once per phase.
    A provider that fails (a compiler bug, say, or out of memory) is recorded as skipped with the error; it never
    ends the run."""
    measurements, runs = [], []
    states = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in models}  # AdamW must not drift
    for provider in providers:
        problem = provider_problem(provider, device)
        if problem:
            measurements.append(Measurement(provider, seq_len, args.batch_size, skipped=problem))
            progress.update(1)
            continue
        try:
            run = ProviderRun(provider, models, args.batch_size, seq_len, device, autocast_dtype)
            for phase in ("forward", "train_step"):
                for _ in range(args.warmup):
                    run.time(phase, record=False)
            runs.append(run)
        except Exception as error:  # noqa: BLE001  (reported in the record instead)
            measurements.append(Measurement(provider, seq_len, args.batch_size, skipped=failure(error)))
            progress.update(1)
    for phase in ("forward", "train_step"):
        for _ in range(args.repeats):
            for run in list(runs):
                try:
                    run.time(phase)
                except Exception as error:  # noqa: BLE001
                    runs.remove(run)
                    measurements.append(Measurement(run.provider, seq_len, args.batch_size, skipped=failure(error)))
                    progress.update(1)
    for run in runs:
        measurements.append(run.result(gemm_flops, train_flops))
        progress.update(1)
    for model in models:
        model.load_state_dict(states[id(model)])
    order = {p: i for i, p in enumerate(providers)}
    return sorted(measurements, key=lambda m: order[m.provider])


def span_conv_bytes(values, logits) -> int:
    """Bytes a fused span conv must move in forward + backward: the forward reads values and logits and writes
    the output; the backward reads the gradient, values and logits and writes both gradients."""
    return values.element_size() * (5 * values.numel() + 3 * logits.numel())


def span_conv_summary(device, dtype, warmup, repeats) -> dict:
    """The span conv at base shapes, forward + backward: eager (transformers' unfold path) against the best
    backend here, and the fraction of the copy bandwidth that backend reaches."""
    import convbert_fast as cf
    from convbert_fast.ops.dynamic_span_conv import dynamic_span_conv_eager

    batch = 32 if device.type == "cuda" else 8
    values = torch.randn(batch, 512, 384, device=device, dtype=dtype, requires_grad=True)
    logits = torch.randn(batch, 512, 6 * 9, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(values)

    def step(fn):
        return lambda: torch.autograd.grad(fn(values, logits, 6), (values, logits), grad)

    eager_ms, _ = time_ms(step(dynamic_span_conv_eager), device, warmup, repeats)
    best = "cpp" if provider_problem("cpp", device) is None else "eager"
    with cf.use_backend(best):
        best_ms, _ = time_ms(step(cf.ops.dynamic_span_conv), device, warmup, repeats)
    moved = span_conv_bytes(values, logits)
    return {
        "span_conv_backend": best,
        "span_conv_eager_ms": eager_ms,
        "span_conv_ms": best_ms,
        "span_conv_vs_eager": eager_ms / best_ms,
        "span_conv_bandwidth_fraction": moved / (best_ms / 1e3) / copy_bandwidth(device),
    }


def versions(device) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    driver = None
    if device.type == "cuda":
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip() or None  # fmt: skip
        except OSError:
            pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "driver": driver,
    }


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .env import cpu_name

    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _ratio(a, b):
    return None if a is None or b is None else a / b


def summarize(measurements: list[Measurement], provider_ours: str) -> dict:
    """Headline figures at the longest sequence length measured, for our fastest-by-default provider."""
    done = [m for m in measurements if m.skipped is None]
    if not done:
        return {}
    seq_len = max(m.seq_len for m in done)
    at = {m.provider: m for m in done if m.seq_len == seq_len}
    ours, base, compiled = at.get(provider_ours), at.get(BASELINE), at.get(COMPILE_BASELINE)
    return {
        "seq_len": seq_len,
        "provider": provider_ours,
        "train_step_vs_eager": _ratio(base and base.train_step_ms, ours and ours.train_step_ms),
        "train_step_vs_compile": _ratio(compiled and compiled.train_step_ms, ours and ours.train_step_ms),
        "inference_vs_eager": _ratio(base and base.forward_ms, ours and ours.forward_ms),
        "peak_memory_vs_eager": _ratio(ours and ours.peak_memory_mb, base and base.peak_memory_mb),
    }


def table(measurements: list[Measurement]) -> str:
    rows = [
        f"{'L':>5} {'provider':<21} {'fwd ms':>9} {'train ms':>9} {'train tok/s':>12} {'fwd x eager':>11} "
        f"{'train x eager':>13} {'fwd x compile':>13} {'train x compile':>15} {'peak MB':>8} {'GEMM rate':>9}"
    ]
    by_len: dict[int, dict[str, Measurement]] = {}
    for m in measurements:
        by_len.setdefault(m.seq_len, {})[m.provider] = m

    def fmt(value, spec, suffix=""):
        return "-" if value is None else f"{value:{spec}}{suffix}"

    for seq_len, at in by_len.items():
        base, compiled = at.get(BASELINE), at.get(COMPILE_BASELINE)
        for m in at.values():
            if m.skipped:
                rows.append(f"{seq_len:>5} {m.provider:<21} skipped: {m.skipped}")
                continue
            rows.append(
                f"{seq_len:>5} {m.provider:<21} {m.forward_ms:>9.1f} {m.train_step_ms:>9.1f} "
                f"{m.train_tokens_per_s:>12.0f} "
                f"{fmt(_ratio(base and base.forward_ms, m.forward_ms), '>10.2f', 'x')} "
                f"{fmt(_ratio(base and base.train_step_ms, m.train_step_ms), '>12.2f', 'x')} "
                f"{fmt(_ratio(compiled and compiled.forward_ms, m.forward_ms), '>12.2f', 'x')} "
                f"{fmt(_ratio(compiled and compiled.train_step_ms, m.train_step_ms), '>14.2f', 'x')} "
                f"{fmt(m.peak_memory_mb, '>8.0f')} "
                f"{fmt(m.gemm_rate_fraction and 100 * m.gemm_rate_fraction, '>8.1f', '%')}"
            )
    return "\n".join(rows)


def plot(measurements: list[Measurement], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {m.seq_len: m.train_step_ms for m in measurements if m.provider == BASELINE and not m.skipped}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider in dict.fromkeys(m.provider for m in measurements):
        points = sorted(
            (m.seq_len, base[m.seq_len] / m.train_step_ms)
            for m in measurements
            if m.provider == provider and not m.skipped and m.seq_len in base
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=provider)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    lengths = sorted({m.seq_len for m in measurements})
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.minorticks_off()
    ax.set_xlabel("sequence length")
    ax.set_ylabel("training-step speed-up over transformers' eager model")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    from tqdm import tqdm

    from .configs import named_config

    device = torch.device(args.device)
    # a position table long enough for every length asked for (speed does not depend on its size)
    config = named_config(args.config, num_hidden_layers=args.layers, max_position_embeddings=max(512, *args.seq_len))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    # fp32 weights with autocast for bf16/fp16, as training runs
    autocast_dtype = None if dtype == torch.float32 else dtype
    models = build_models(config, device, torch.float32)
    gemm_flops = gemm_rate(device, dtype)
    flops = {seq_len: train_step_flops(models[0], args.batch_size, seq_len, device) for seq_len in args.seq_len}
    providers = args.providers
    ours = next((p for p in ("compile", "cpp", "triton", "eager") if p in providers), providers[-1])
    measurements = []
    with tqdm(total=len(args.seq_len) * len(providers), desc="bench", unit="provider") as progress:
        for seq_len in args.seq_len:
            measurements += measure_length(
                providers, models, args, seq_len, device, autocast_dtype, gemm_flops, flops[seq_len], progress
            )
    summary = summarize(measurements, ours)
    summary.update(span_conv_summary(device, dtype, args.warmup, args.repeats))
    title = (
        f"ConvBertModel {args.config}, {args.layers} layers, batch {args.batch_size}, {args.dtype}, "
        f"{device_name(device)}"
    )
    print(title)
    print(table(measurements))
    print(
        f"span conv fwd+bwd at base shapes: {summary['span_conv_vs_eager']:.1f}x eager "
        f"({summary['span_conv_backend']}), {100 * summary['span_conv_bandwidth_fraction']:.0f}% of copy bandwidth; "
        f"dense GEMM rate here: {gemm_flops / 1e9:.0f} GFLOP/s"
    )
    record = {
        "device": device_name(device),
        "versions": versions(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "command")},
        "gemm_rate_flops": gemm_flops,
        "measurements": [asdict(m) for m in measurements],
        "summary": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(measurements, args.plot, title)
        print(f"wrote {args.plot}")
    return 0
