"""`python -m convbert_fast bench`: our ConvBERT against transformers' eager model and torch.compile of it,
side by side in one run, as a table, a JSON record and a plot.

The model measured is the encoder (ConvBertModel) with a scalar loss on its output: the part our kernels
change. A training step is forward + backward + AdamW step; inference is a forward under no_grad in eval mode.
At each batch (L tokens a row, and with --pad a padded batch of the same L) the providers are timed in rounds,
one call each per round, and each reports the median of its rounds: a drift in the machine's speed then falls
on every provider alike. Compiled providers get fresh graphs per batch, and dynamo's counts say they ran them;
each provider's memory is measured alone. `--markdown` writes the README's tables from committed records.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import re
import statistics
import subprocess
import sys
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
    padded: bool = False  # lengths uniform in [L/2, L] with an attention mask, else every row L tokens
    tokens: int | None = None  # real (not padding) tokens per batch: what tokens/s count
    skipped: str | None = None  # why it could not run here
    forward_ms: float | None = None
    forward_ms_quantiles: list[float] = field(default_factory=list)  # p20, p50, p80
    train_step_ms: float | None = None
    train_step_ms_quantiles: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None  # one training step of this provider alone (see measure_memory)
    activation_memory_mb: float | None = None  # the peak less weights, gradients and optimizer state
    train_tokens_per_s: float | None = None
    inference_tokens_per_s: float | None = None
    train_flops: float | None = None
    gemm_rate_fraction: float | None = None  # model FLOP/s over the GEMM rate measured in the same run
    compiled: bool | None = None  # compiled providers: a graph for both phases and no frame left to eager
    dynamo: dict | None = None  # compiled providers: dynamo's counts per phase (see DynamoCounts)


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
    """fn -> milliseconds of one call; on a GPU between CUDA events, synchronised, so the call's kernels are
    counted and nothing queued before it is."""
    if device.type == "cuda":

        def measure(fn):
            torch.cuda.synchronize(device)
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


def interleaved_ms(fns: dict, device, warmup: int, repeats: int) -> dict[str, tuple[float, list[float]]]:
    """The one timing method of this module: every function warmed up, then `repeats` rounds in which each
    runs once, in turns (a machine whose speed drifts then slows all of them alike); per function the median
    of its rounds and [p20, p50, p80]."""
    measure = _timer(device)
    for fn in fns.values():
        for _ in range(warmup):
            measure(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(measure(fn))
    return {name: summary_of(ms) for name, ms in times.items()}


def time_ms(fn, device, warmup: int, repeats: int) -> tuple[float, list[float]]:
    return interleaved_ms({"fn": fn}, device, warmup, repeats)["fn"]


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one large dense GEMM in `dtype` on `device`, measured now (median of 10, as everything)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = time_ms(lambda: a @ b, device, warmup=2, repeats=10)
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
    """(median, [p20, p50, p80]) of timings in ms; the quantiles interpolate between the rounds (the default
    `exclusive` method extrapolates past them, to below zero with 3 rounds)."""
    times = sorted(times)
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return statistics.median(times), [quantiles[0], statistics.median(times), quantiles[-1]]


def make_batch(config, batch_size, seq_len, padded, device, seed=0):
    """(ids, attention_mask or None, real tokens): the same batch for every provider. Padded: each row's length
    drawn uniformly from [ceil(L/2), L] by a generator seeded with `seed`, the rest padding, masked out."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=generator)
    if not padded:
        return ids.to(device), None, batch_size * seq_len
    lengths = torch.randint((seq_len + 1) // 2, seq_len + 1, (batch_size,), generator=generator)
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, config.pad_token_id or 0)
    return ids.to(device), mask.to(device), int(lengths.sum())


class DynamoCounts:
    """What dynamo did during the calls made `around` it: frames it was handed (`frames`), frames it compiled
    (`frames_ok`; the rest ran eagerly, e.g. past the recompile limit), graphs compiled, recompilations (a
    frame compiled again after a guard failed) and graph breaks."""

    KEYS = ("frames", "frames_ok", "graphs", "recompiles", "graph_breaks")

    def __init__(self):
        self.counts = dict.fromkeys(self.KEYS, 0)

    @staticmethod
    def _snapshot():
        from torch._dynamo.utils import counters

        return (counters["frames"]["total"], counters["frames"]["ok"], counters["stats"]["unique_graphs"],
                sum(counters["graph_break"].values()))  # fmt: skip

    def around(self, fn):
        from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

        clear_compilation_metrics()
        before = self._snapshot()
        try:
            fn()
        finally:
            after = self._snapshot()
            for key, b, a in zip(("frames", "frames_ok", "graphs", "graph_breaks"), before, after):
                self.counts[key] += a - b
            self.counts["recompiles"] += sum(m.recompile_reason is not None for m in get_compilation_metrics())

    @property
    def compiled(self) -> bool:
        return self.counts["graphs"] > 0 and self.counts["frames_ok"] == self.counts["frames"]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cpu_peak_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held above its level at the start while `fn` ran: torch.profiler
    with profile_memory=True records every allocation and free, summed here in time order. It sees tensors
    (ours, inductor's and oneDNN's through torch's allocator), not the Python heap or a library's own mallocs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            level += event.nbytes()
            peak = max(peak, level)
    return peak


CPU_MEMORY_TOOL = "torch.profiler(profile_memory=True): torch's CPU allocations, summed in time order"
CUDA_MEMORY_TOOL = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"


class ProviderRun:
    """One provider on one batch: its runner (compiled or not), optimizer and inputs, timed one call at a time
    so that `measure_batch` can interleave the providers round by round (a machine whose speed drifts then
    slows every provider alike instead of whichever ran during the slow minute)."""

    def __init__(self, provider, models, batch, device, autocast_dtype):
        theirs, ours = models
        self.provider, self.device = provider, device
        self.model = theirs if provider.startswith("transformers") else ours
        self.backend = {"eager": "eager", "cpp": "cpp", "triton": "triton"}.get(provider, "auto")
        # static shapes: a graph per batch shape and mode, as a fixed-shape training run would have (dynamo is
        # reset before each batch, so the recompile limit is never reached)
        self.compiled = provider.endswith("compile")
        self.runner = torch.compile(self.model, dynamic=False) if self.compiled else self.model
        self.ids, self.mask, self.tokens = batch
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.autocast_dtype = autocast_dtype
        self.times: dict[str, list[float]] = {"forward": [], "train_step": []}
        self.dynamo = {"forward": DynamoCounts(), "train_step": DynamoCounts()}
        self.peak_memory_mb = self.activation_memory_mb = None
        self.measure = _timer(device)

    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def forward(self):
        with torch.no_grad(), self._autocast():
            self.runner(self.ids, attention_mask=self.mask)

    def train_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.runner(self.ids, attention_mask=self.mask).last_hidden_state.float().square().mean()
        loss.backward()
        self.optimizer.step()

    def time(self, phase: str, record: bool = True) -> None:
        import convbert_fast as cf

        with cf.use_backend(self.backend):
            self.model.train(phase == "train_step")
            call = getattr(self, phase)
            if self.compiled:
                ms = []
                self.dynamo[phase].around(lambda: ms.append(self.measure(call)))
                ms = ms[0]
            else:
                ms = self.measure(call)
        if record:
            self.times[phase].append(ms)

    def measure_memory(self, others) -> None:
        """One more training step with only this provider's state in play: every other run's gradients and
        optimizer state freed, the allocator's cache emptied, the peak counted from here. The peak is this
        provider's weights, optimizer state and batch plus the most the step allocated above that (a second
        model left resident holds neither, and is not counted); activation memory is the peak less weights,
        gradients and optimizer state."""
        import convbert_fast as cf

        for run in others:
            run.optimizer.zero_grad(set_to_none=True)
            run.optimizer.state.clear()
        if not self.optimizer.state:  # an earlier run's measurement freed it: remake it, unmeasured
            with cf.use_backend(self.backend):
                self.model.train(True)
                self.train_step()
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        params = [p for p in self.model.parameters()]
        weights = tensor_bytes(params)
        grads = tensor_bytes(p for p in params if p.requires_grad)
        state = tensor_bytes(t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        batch = tensor_bytes(t for t in (self.ids, self.mask) if t is not None)
        with cf.use_backend(self.backend):
            self.model.train(True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                start = torch.cuda.memory_allocated(self.device)
                self.train_step()
                torch.cuda.synchronize(self.device)
                above = torch.cuda.max_memory_allocated(self.device) - start
            else:
                above = cpu_peak_bytes(self.train_step)
        peak = weights + state + batch + above
        self.peak_memory_mb = peak / 2**20
        self.activation_memory_mb = (peak - weights - grads - state) / 2**20

    def result(self, seq_len, batch_size, gemm_flops, train_flops) -> Measurement:
        result = Measurement(self.provider, seq_len, batch_size, padded=self.mask is not None, tokens=self.tokens)
        result.peak_memory_mb, result.activation_memory_mb = self.peak_memory_mb, self.activation_memory_mb
        result.forward_ms, result.forward_ms_quantiles = summary_of(self.times["forward"])
        result.train_step_ms, result.train_step_ms_quantiles = summary_of(self.times["train_step"])
        result.train_tokens_per_s = self.tokens / (result.train_step_ms / 1e3)
        result.inference_tokens_per_s = self.tokens / (result.forward_ms / 1e3)
        if train_flops is not None:
            result.train_flops = train_flops
            result.gemm_rate_fraction = train_flops / (result.train_step_ms / 1e3) / gemm_flops
        if self.compiled:
            result.dynamo = {phase: counts.counts for phase, counts in self.dynamo.items()}
            result.compiled = all(counts.compiled for counts in self.dynamo.values())
        return result


def failure(error: Exception) -> str:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "out of memory"
    return f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"


def measure_batch(providers, models, args, seq_len, padded, device, autocast_dtype, gemm_flops, train_flops,
                  progress):  # fmt: skip
    """Every provider on one batch (L tokens a row, or padded): warm-up calls, then `repeats` rounds that time
    each provider once per phase, then each provider's memory alone. A provider that fails (a compiler bug,
    say, or out of memory) is recorded as skipped with the error; it never ends the run."""
    torch._dynamo.reset()  # fresh graphs for this shape: the recompile limit counts per code object
    batch = make_batch(models[0].config, args.batch_size, seq_len, padded, device, seed=seq_len)
    measurements, runs = [], []

    def skip(provider, why):
        measurements.append(Measurement(provider, seq_len, args.batch_size, padded, batch[2], skipped=why))
        progress.update(1)

    states = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in models}  # AdamW must not drift
    for provider in providers:
        problem = provider_problem(provider, device)
        if problem:
            skip(provider, problem)
            continue
        try:
            run = ProviderRun(provider, models, batch, device, autocast_dtype)
            for phase in ("forward", "train_step"):
                for _ in range(args.warmup):
                    run.time(phase, record=False)
            runs.append(run)
        except Exception as error:  # noqa: BLE001  (reported in the record instead)
            skip(provider, failure(error))
    for phase in ("forward", "train_step"):
        for _ in range(args.repeats):
            for run in list(runs):
                try:
                    run.time(phase)
                except Exception as error:  # noqa: BLE001
                    runs.remove(run)
                    skip(run.provider, failure(error))
    for run in list(runs):
        try:
            run.measure_memory([other for other in runs if other is not run])
        except Exception as error:  # noqa: BLE001
            runs.remove(run)
            skip(run.provider, failure(error))
    for run in runs:
        measurements.append(run.result(seq_len, args.batch_size, gemm_flops, train_flops))
        progress.update(1)
    for model in models:
        model.load_state_dict(states[id(model)])
    order = {p: i for i, p in enumerate(providers)}
    return sorted(measurements, key=lambda m: order[m.provider])


def span_conv_bytes(values, logits) -> int:
    """Bytes a fused span conv must move in forward + backward: the forward reads values and logits and writes
    the output; the backward reads the gradient, values and logits and writes both gradients."""
    return values.element_size() * (5 * values.numel() + 3 * logits.numel())


def ops_summary(device, dtype, warmup, repeats) -> dict:
    """Each op forward + backward at the shapes of the issues (B=8 on the CPU, 32 on a GPU; L=512; 6 conv heads
    of 64, K=9, separable conv 768 -> 384, grouped linear 384 -> 1536 in 2 groups): the `eager` backend (the
    seed's code, step for step, as transformers runs it) against the best backend here, all of them taking
    turns round by round; and the share of the copy bandwidth the span conv reaches."""
    import convbert_fast as cf

    best = "cpp" if provider_problem("cpp", device) is None else "eager"
    batch, seq_len, channels, heads, head_size, kernel = 32 if device.type == "cuda" else 8, 512, 768, 6, 64, 9
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype).requires_grad_()

    values, logits = leaf(batch, seq_len, heads * head_size), leaf(batch, seq_len, heads * kernel)
    x, query = leaf(batch, seq_len, channels), leaf(batch, seq_len, heads * head_size)
    depthwise, pointwise, bias = leaf(channels, 1, kernel, scale=0.3), leaf(384, channels, 1, scale=0.03), leaf(384)
    ffn_x, ffn_w, ffn_b = leaf(batch, seq_len, 384), leaf(2, 192, 768, scale=0.02), leaf(1536)
    ops = {
        "dynamic_span_conv": ((values, logits), lambda: cf.ops.dynamic_span_conv(values, logits, heads)),
        "separable_conv1d": (
            (x, depthwise, pointwise, bias, query),
            lambda: cf.ops.separable_conv1d(x, depthwise, pointwise, bias, multiplier=query),
        ),
        "grouped_linear": ((ffn_x, ffn_w, ffn_b), lambda: cf.ops.grouped_linear(ffn_x, ffn_w, ffn_b)),
    }
    fns = {}
    for op, (inputs, fn) in ops.items():
        with torch.no_grad():
            grad = torch.randn_like(fn())  # a dense upstream gradient, as in a model

        for backend in ("eager", best):

            def step(fn=fn, inputs=inputs, grad=grad, backend=backend):
                with cf.use_backend(backend):
                    torch.autograd.grad(fn(), inputs, grad)

            fns[f"{op} {backend}"] = step
    times = interleaved_ms(fns, device, warmup, repeats)
    result = {"backend": best, "batch_size": batch, "seq_len": seq_len, "dtype": str(dtype).split(".")[-1]}
    for op in ops:
        eager_ms, best_ms = times[f"{op} eager"][0], times[f"{op} {best}"][0]
        result[op] = {"eager_ms": eager_ms, "ms": best_ms, "vs_eager": eager_ms / best_ms}
    seconds = result["dynamic_span_conv"]["ms"] / 1e3
    result["dynamic_span_conv"]["bandwidth_fraction"] = span_conv_bytes(values, logits) / seconds / copy_bandwidth(
        device
    )
    return result


def versions(device) -> dict:
    """env.versions(), and the driver's version on a GPU (nvidia-smi's; None where it cannot be asked)."""
    from .env import versions as env_versions

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
    from .env import cpu_name

    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def provenance() -> dict:
    """The commit measured and whether the tree had uncommitted changes to tracked files (None: not a git
    checkout)."""

    def git(*args):
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent)
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _ratio(a, b):
    return None if a is None or b is None else a / b


def summarize(measurements: list[Measurement], provider_ours: str) -> dict:
    """Headline figures at the longest sequence length measured, unpadded (padded: the `padded_` keys), for our
    fastest-by-default provider."""
    done = [m for m in measurements if m.skipped is None]
    if not done:
        return {}
    seq_len = max(m.seq_len for m in done)
    summary = {"seq_len": seq_len, "provider": provider_ours}
    for padded, prefix in ((False, ""), (True, "padded_")):
        at = {m.provider: m for m in done if m.seq_len == seq_len and m.padded == padded}
        if not at:
            continue
        ours, base, compiled = at.get(provider_ours), at.get(BASELINE), at.get(COMPILE_BASELINE)
        summary |= {
            prefix + "train_step_vs_eager": _ratio(base and base.train_step_ms, ours and ours.train_step_ms),
            prefix + "train_step_vs_compile": _ratio(compiled and compiled.train_step_ms, ours and ours.train_step_ms),
            prefix + "inference_vs_eager": _ratio(base and base.forward_ms, ours and ours.forward_ms),
            prefix + "peak_memory_vs_eager": _ratio(ours and ours.peak_memory_mb, base and base.peak_memory_mb),
        }
    return summary


def provider_label(m) -> str:
    """The provider as tables show it: a compiled provider that left any frame to eager says so."""
    m = m if isinstance(m, dict) else asdict(m)
    return m["provider"] + (" (NOT compiled: fell back to eager)" if m.get("compiled") is False else "")


def _by_batch(measurements):
    by_batch: dict[tuple, dict] = {}
    for m in measurements:
        by_batch.setdefault((m["seq_len"], m["padded"]), {})[m["provider"]] = m
    return by_batch


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(measurements: list[Measurement]) -> str:
    rows = [
        f"{'L':>5} {'pad':>3} {'provider':<21} {'fwd ms':>9} {'train ms':>9} {'train tok/s':>12} {'fwd x eager':>11} "
        f"{'train x eager':>13} {'fwd x compile':>13} {'train x compile':>15} {'peak MB':>8} {'act MB':>7} "
        f"{'GEMM rate':>9}"
    ]
    for (seq_len, padded), at in _by_batch([asdict(m) for m in measurements]).items():
        base, compiled = at.get(BASELINE), at.get(COMPILE_BASELINE)
        for m in at.values():
            lead = f"{seq_len:>5} {'yes' if padded else 'no':>3} {provider_label(m):<21}"
            if m["skipped"]:
                rows.append(f"{lead} skipped: {m['skipped']}")
                continue
            rows.append(
                f"{lead} {m['forward_ms']:>9.1f} {m['train_step_ms']:>9.1f} {m['train_tokens_per_s']:>12.0f} "
                f"{_fmt(_ratio(base and base['forward_ms'], m['forward_ms']), '>10.2f', 'x')} "
                f"{_fmt(_ratio(base and base['train_step_ms'], m['train_step_ms']), '>12.2f', 'x')} "
                f"{_fmt(_ratio(compiled and compiled['forward_ms'], m['forward_ms']), '>12.2f', 'x')} "
                f"{_fmt(_ratio(compiled and compiled['train_step_ms'], m['train_step_ms']), '>14.2f', 'x')} "
                f"{_fmt(m['peak_memory_mb'], '>8.0f')} {_fmt(m['activation_memory_mb'], '>7.0f')} "
                f"{_fmt(m['gemm_rate_fraction'] and 100 * m['gemm_rate_fraction'], '>8.1f', '%')}"
            )
    return "\n".join(rows)


def plot(measurements: list[Measurement], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [m for m in measurements if not m.skipped]
    base = {(m.seq_len, m.padded): m.train_step_ms for m in done if m.provider == BASELINE}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider in dict.fromkeys(m.provider for m in measurements):
        for padded in (False, True):
            points = sorted(
                (m.seq_len, base[m.seq_len, padded] / m.train_step_ms)
                for m in done
                if m.provider == provider and m.padded == padded and (m.seq_len, padded) in base
            )
            if points:
                label = provider + (", padded" if padded else "")
                ax.plot(*zip(*points), marker="o", linestyle="--" if padded else "-", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    lengths = sorted({m.seq_len for m in measurements})
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.minorticks_off()
    ax.set_xlabel("sequence length")
    ax.set_ylabel("training-step speed-up over transformers' eager model")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    """Measures, printing the table at the end. The record (--json) is written after the op summary and again
    after every batch, marked `complete: false` until the last: a run stopped by a time limit (SIGINT, as
    `timeout --signal=INT` sends) keeps what it measured, says where it stopped, and exits 130."""
    from tqdm import tqdm

    from .configs import named_config

    device = torch.device(args.device)
    began = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **provenance()}
    # a position table long enough for every length asked for (speed does not depend on its size)
    config = named_config(args.config, num_hidden_layers=args.layers, max_position_embeddings=max(512, *args.seq_len))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    # fp32 weights with autocast for bf16/fp16, as training runs
    autocast_dtype = None if dtype == torch.float32 else dtype
    providers = args.providers
    ours = next((p for p in ("compile", "cpp", "triton", "eager") if p in providers), providers[-1])
    batches = [(seq_len, padded) for seq_len in args.seq_len for padded in ((False, True) if args.pad else (False,))]
    title = (
        f"ConvBertModel {args.config}, {args.layers} layers, batch {args.batch_size}, {args.dtype}, "
        f"{device_name(device)}"
    )
    memory_tool = CUDA_MEMORY_TOOL if device.type == "cuda" else CPU_MEMORY_TOOL
    measurements: list[Measurement] = []
    record = {
        "device": device_name(device),
        "versions": versions(device),
        **began,  # the code that ran: the tree when the run began
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "command", "markdown", "readme",
                                                                       "check", "choose")},  # fmt: skip
        "memory_tool": memory_tool,
        "complete": False,
        "stopped": None,  # why a run that is not complete ended early
        "gemm_rate_flops": None,
        "measurements": [],
        "ops": None,
        "summary": {},
    }

    def save():
        summary = summarize(measurements, ours)
        if record["ops"] is not None:
            span_conv = record["ops"]["dynamic_span_conv"]
            summary.update(span_conv_vs_eager=span_conv["vs_eager"],
                           span_conv_bandwidth_fraction=span_conv["bandwidth_fraction"])  # fmt: skip
        record["measurements"] = [asdict(m) for m in measurements]
        record["summary"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")

    try:
        # the ops first: a minute at most, and the figures the kernels are judged by
        record["ops"] = ops_summary(device, dtype, args.warmup, args.repeats)
        save()
        models = build_models(config, device, torch.float32)
        record["gemm_rate_flops"] = gemm_flops = gemm_rate(device, dtype)
        flops = {seq_len: train_step_flops(models[0], args.batch_size, seq_len, device) for seq_len in args.seq_len}
        with tqdm(total=len(batches) * len(providers), desc="bench", unit="provider") as progress:
            for seq_len, padded in batches:
                measurements.extend(measure_batch(providers, models, args, seq_len, padded, device, autocast_dtype,
                                                  gemm_flops, flops[seq_len], progress))  # fmt: skip
                save()
        del models
        record["complete"] = True
    except KeyboardInterrupt:
        done = len({(m.seq_len, m.padded) for m in measurements})
        record["stopped"] = f"interrupted (SIGINT) after {done} of {len(batches)} batches"
        print(f"\nSTOPPED: {record['stopped']}; the record keeps what was measured", file=sys.stderr)
    save()
    ops = record["ops"]
    print(title)
    print(table(measurements))
    print(f"(medians of {args.repeats} rounds; padded rows: lengths uniform in [L/2, L], tokens/s of real tokens; "
          f"memory: {memory_tool})")  # fmt: skip
    if ops is not None:
        for op in ("dynamic_span_conv", "separable_conv1d", "grouped_linear"):
            print(f"{op} fwd+bwd at base shapes: {ops[op]['eager_ms']:.1f} ms eager, {ops[op]['ms']:.1f} ms "
                  f"{ops['backend']} ({ops[op]['vs_eager']:.1f}x)")  # fmt: skip
        print(f"span conv: {100 * ops['dynamic_span_conv']['bandwidth_fraction']:.0f}% of copy bandwidth")
    if record["gemm_rate_flops"] is not None:
        print(f"dense GEMM rate here: {record['gemm_rate_flops'] / 1e9:.0f} GFLOP/s")
    not_compiled = [provider_label(m) for m in measurements if m.compiled is False]
    if not_compiled:
        print(f"WARNING: {len(not_compiled)} compiled measurement(s) fell back to eager: see `dynamo` in the record")
    if args.json:
        print(f"wrote {args.json}" + ("" if record["complete"] else " (incomplete)"))
    if args.plot and measurements:
        plot(measurements, args.plot, title)
        print(f"wrote {args.plot}")
    return 0 if record["complete"] else 130


# The README's performance tables, written from committed records (`bench --markdown RECORD... --readme
# README.md`); a test checks that the README holds exactly what this writes.

OURS = {"eager": "ours, `eager`", "cpp": "ours, `cpp`", "triton": "ours, `triton`", "compile": "ours, compiled"}
README_BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def _source(record, path) -> str:
    versions_ = record["versions"]
    dirty = {True: "uncommitted changes", False: "clean tree", None: "tree state unknown"}[record.get("git_dirty")]
    commit = (record.get("git_commit") or "unknown")[:10]
    return (
        f"Record `{path}`: {record['device']}, torch {versions_['torch']}, transformers {versions_['transformers']}, "
        f"{record['date'][:10]}, commit `{commit}` ({dirty})."
    )


def model_markdown(record, path) -> str:
    s = record["settings"]
    lines = [
        f"ConvBERT-{s['config']} encoder with {s['layers']} layer{'s' if s['layers'] != 1 else ''}, "
        f"B={s['batch_size']}, {s['dtype']}: medians of "
        f"{s['repeats']} rounds in which the providers take turns; padded rows draw each row's length uniformly "
        "from [L/2, L] and pass the attention mask to both models; tokens/s counts real tokens; peak memory is "
        f"one training step of the provider alone ({record['memory_tool']}), activations are the peak less "
        "weights, gradients and AdamW state. " + _source(record, path) + _incomplete(record),
        "",
        "| L | rows | provider | forward | training step | train tokens/s | forward vs transformers "
        "| step vs transformers | step vs transformers-compile | peak memory | activations |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (seq_len, padded), at in _by_batch(record["measurements"]).items():
        base, compiled = at.get(BASELINE), at.get(COMPILE_BASELINE)
        rows = "L/2..L, masked" if padded else "all L"
        for m in at.values():
            label = provider_label({**m, "provider": OURS.get(m["provider"], m["provider"])})
            if m["skipped"]:
                lines.append(f"| {seq_len} | {rows} | {label} | skipped: {m['skipped']} |||||||")
                continue
            cells = [
                f"{m['forward_ms']:.1f} ms",
                f"{m['train_step_ms']:.1f} ms",
                f"{m['train_tokens_per_s']:.0f}",
                _fmt(_ratio(base and base["forward_ms"], m["forward_ms"]), ".2f", "x"),
                _fmt(_ratio(base and base["train_step_ms"], m["train_step_ms"]), ".2f", "x"),
                _fmt(_ratio(compiled and compiled["train_step_ms"], m["train_step_ms"]), ".2f", "x"),
                _fmt(m["peak_memory_mb"], ".1f", " MB"),
                _fmt(m["activation_memory_mb"], ".1f", " MB"),
            ]
            lines.append(f"| {seq_len} | {rows} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _incomplete(record) -> str:
    """A sentence for a record whose run ended early (records from before `complete` existed were complete)."""
    return "" if record.get("complete", True) else f" **Incomplete run: {record['stopped'] or 'stopped early'}.**"


def ops_markdown(record, path) -> str:
    ops = record["ops"]
    if ops is None:
        return f"Not measured: the run stopped first. {_source(record, path)}{_incomplete(record)}\n"
    lines = [
        f"Each op forward + backward, B={ops['batch_size']}, L={ops['seq_len']}, {ops['dtype']}, 6 conv heads of "
        "64, K=9: the `eager` backend (the seed's code as transformers runs it) against "
        f"`{ops['backend']}`, taking turns, medians of {record['settings']['repeats']} rounds. "
        + _source(record, path),
        "",
        f"| op | `eager` (transformers' code) | `{ops['backend']}` | speed-up |",
        "|---|---|---|---|",
    ]
    shapes = {
        "dynamic_span_conv": "`dynamic_span_conv` (eager: the unfold path)",
        "separable_conv1d": "`separable_conv1d` (768 -> 384, times the query; eager: with the transposes)",
        "grouped_linear": "`grouped_linear` (384 -> 1536, 2 groups)",
    }
    for op, name in shapes.items():
        o = ops[op]
        lines.append(f"| {name} | {o['eager_ms']:.1f} ms | {o['ms']:.1f} ms | {o['vs_eager']:.2f}x |")
    return "\n".join(lines) + "\n"


def breakdown_markdown(record, path) -> str:
    results = record["breakdown_ms"]
    names = list(results)
    categories = sorted({c for r in results.values() for c in r}, key=lambda c: -results[names[0]].get(c, 0.0))
    totals = {n: sum(results[n].values()) for n in names}
    lines = [
        f"ConvBERT-base with {record['layers']} layers, B={record['batch_size']}, L={record['seq_len']}, "
        f"{record['dtype']}, a training step without the optimizer: self time per kind of op under "
        f"torch.profiler, in the round of median total of {record['rounds']} (the models taking turns). "
        + _source(record, path),
        "",
        "| work | " + " | ".join(names) + " |",
        "|---" * (1 + len(names)) + "|",
    ]
    for category in categories + ["total"]:
        cells = []
        for n in names:
            ms = totals[n] if category == "total" else results[n].get(category, 0.0)
            cells.append(f"{ms:.1f} ms" + ("" if category == "total" else f" ({100 * ms / totals[n]:.0f}%)"))
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_blocks(paths) -> dict[str, str]:
    """README block name -> its markdown, from bench records (blocks `model`, `ops`) and breakdown records
    (`breakdown`), in the order given."""
    parts: dict[str, list[str]] = {}
    for path in paths:
        record = json.loads(Path(path).read_text())
        if "breakdown_ms" in record:
            parts.setdefault("breakdown", []).append(breakdown_markdown(record, path))
        else:
            parts.setdefault("model", []).append(model_markdown(record, path))
            parts.setdefault("ops", []).append(ops_markdown(record, path))
    return {name: "\n".join(texts) for name, texts in parts.items()}


def render_readme(text: str, blocks: dict[str, str]) -> str:
    """`text` with each `<!-- bench:NAME -->` ... `<!-- /bench:NAME -->` block's body replaced by blocks[NAME]."""
    found = [m["name"] for m in README_BLOCK.finditer(text)]
    if sorted(found) != sorted(blocks):
        raise ValueError(f"the README's generated blocks {found} are not the records' blocks {sorted(blocks)}")
    return README_BLOCK.sub(lambda m: m[1] + blocks[m["name"]] + m[4], text)


def markdown_main(args) -> int:
    blocks = markdown_blocks(args.markdown)
    if not args.readme:
        print("\n".join(f"<!-- bench:{name} -->\n{body}<!-- /bench:{name} -->" for name, body in blocks.items()))
        return 0
    text = Path(args.readme).read_text()
    new = render_readme(text, blocks)
    if args.check:
        if new != text:
            print(f"{args.readme} does not hold the tables its records give: run `python -m convbert_fast bench "
                  f"--markdown {' '.join(args.markdown)} --readme {args.readme}`", file=sys.stderr)  # fmt: skip
            return 1
        print(f"{args.readme}: its tables are what the records give")
        return 0
    Path(args.readme).write_text(new)
    print(f"wrote the tables of {args.readme}")
    return 0


# `bench --choose OPS_RECORD`: MEASURED_CUDA_CHOICE from the op benchmarks' JSON (pytest-benchmark's, as
# tools/gpu_check.sh writes it): per op, the backend whose fwd+bwd medians, summed over the op's benchmark
# groups (with and without the multiplier, the activation), are the least.

CHOICE_BACKENDS = ("cpp", "triton")


def op_medians(record: dict) -> dict[tuple[str, str], float]:
    """(benchmark group, provider) -> median ms, from pytest-benchmark's JSON."""
    return {(b["group"], b["params"]["provider"]): b["stats"]["median"] * 1e3 for b in record["benchmarks"]}


def measured_choices(record: dict) -> dict[str, dict]:
    """op -> {"backend": the fastest of CHOICE_BACKENDS that ran every group of the op, "ms": {backend: summed
    median ms}, "groups": [group names]} for each op both backends ran; ops with one backend are left out."""
    from .ops.backend import OP_NAMES

    by_op: dict[str, dict[str, dict[str, float]]] = {}  # op -> backend -> group -> median ms
    for (group, provider), ms in op_medians(record).items():
        op = next((name for name in OP_NAMES if group.startswith(name)), None)
        if op is not None and provider in CHOICE_BACKENDS:
            by_op.setdefault(op, {}).setdefault(provider, {})[group] = ms
    choices = {}
    for op, by_backend in by_op.items():
        groups = sorted(set().union(*(g.keys() for g in by_backend.values())))
        complete = {b: sum(g.values()) for b, g in by_backend.items() if sorted(g) == groups}
        if len(complete) > 1:
            choices[op] = {"backend": min(complete, key=complete.get), "ms": complete, "groups": groups}
    return choices


def choose_main(path: str) -> int:
    record = json.loads(Path(path).read_text())
    families = {b.get("extra_info", {}).get("gpu_family") for b in record.get("benchmarks", [])}
    if None in families or len(families) != 1:
        print(f"{path}: not a CUDA op-benchmark record of one GPU family (pytest benchmarks --bench-device cuda "
              f"--benchmark-json=...); families found: {sorted(map(str, families))}", file=sys.stderr)  # fmt: skip
        return 2
    (family,) = families
    print(f"# MEASURED_CUDA_CHOICE entries from {path} ({record['benchmarks'][0]['extra_info']['device']}, "
          f"{record.get('datetime', 'date unknown')[:10]}): fwd+bwd medians summed over each op's groups")  # fmt: skip
    for op, choice in measured_choices(record).items():
        times = ", ".join(f"{b} {ms:.3f} ms" for b, ms in sorted(choice["ms"].items()))
        print(f'("{family}", "{op}"): "{choice["backend"]}",  # {times}')
    # the two sets of CUDA kernels (README): the slower goes once a GPU has run both
    medians = op_medians(record)
    for group in dict.fromkeys(g for g, provider in medians if provider == "cpp-v1"):
        if (group, "cpp") in medians:
            v1, v2 = medians[group, "cpp-v1"], medians[group, "cpp"]
            print(f"# CUDA kernels, {group}: v1 {v1:.3f} ms, v2 {v2:.3f} ms: {'v2' if v2 <= v1 else 'v1'} faster")
    return 0
