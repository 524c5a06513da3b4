"""How the benchmark times and measures: calls taking turns round by round, each reported by a low quantile, the dense
GEMM rate and copy bandwidth of this device, dynamo's counts, and the CPU allocator's peak."""

from __future__ import annotations

import os
import random
import statistics
import time

# kineto (torch.profiler's backend, used by the memory measurement and benchmarks/breakdown.py) prints a
# `USDT: ... profiler_start` line per profiler session unless this is 6 (5 does not silence it) before the first
KINETO_LOG_LEVEL = "6"
os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_LOG_LEVEL)

import torch

# What every time of the bench reports: the 20th percentile of its rounds (interpolated between them). On a shared
# machine interruptions (another tenant, the OS) only ever add time, here to a fifth to a third of the calls, and a
# median then lands in either mode by chance: two default runs, one after the other on an idle Xeon, agreed within
# 0.05 on 78 and 83 of their 108 ratios of medians, and on 97 and 98 of the same ratios of 20th percentiles.
HEADLINE_QUANTILE = 0.2


# glibc's malloc serves a block above its mmap threshold with fresh pages from the kernel, faulted in on first touch,
# and hands the heap's free top back above its trim threshold; both thresholds move up as such blocks are freed, so
# which of a step's buffers cost page faults depends on everything the process ran before. Fixed, they took 5% off
# every provider's training step and 2% off its forward on the idle Xeon (medians over a default run's
# measurements). Whether two default runs agree better is not settled: pairs of runs, one right after the other,
# agreed within 0.05 on 97 and 86 of 108 ratios with them fixed, and on 82 without (the same evening).
MALLOC_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks up to this come from the heap and are reused
MALLOC_TRIM_THRESHOLD = 256 * 2**20  # the heap's free top kept up to this


def fix_malloc_thresholds() -> str:
    """Fixes glibc malloc's mmap and trim thresholds for the rest of this process (the bench's own: the library never
    does this to a user's process) unless the environment set them; returns what holds, for the record."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return "not glibc's malloc: left as it is"
    given = [name for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if name in os.environ]
    if given:
        return f"glibc malloc as the environment sets it ({', '.join(f'{n}={os.environ[n]}' for n in given)})"
    libc = ctypes.CDLL(None)
    settings = {-3: MALLOC_MMAP_THRESHOLD, -1: MALLOC_TRIM_THRESHOLD}  # malloc.h: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    if not all(libc.mallopt(option, value) for option, value in settings.items()):
        return "glibc malloc: mallopt refused the thresholds, left as they were"
    return (
        f"glibc malloc, thresholds fixed for the run: mmap {MALLOC_MMAP_THRESHOLD >> 20} MiB, "
        f"trim {MALLOC_TRIM_THRESHOLD >> 20} MiB"
    )


def headline(times: list[float]) -> float:
    """The HEADLINE_QUANTILE of `times`, interpolated between the sorted values (the value itself for one): the
    first cut of statistics.quantiles' inclusive method, as summary_of's p20."""
    if len(times) == 1:
        return times[0]
    return statistics.quantiles(times, n=round(1 / HEADLINE_QUANTILE), method="inclusive")[0]


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
    runs once, in turns (a machine whose speed drifts then slows all of them alike); per function the headline
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


GEMM_CALL_S = 1.0  # the longest a CPU's GEMM-rate call should take (see cpu_gemm_size)


def cpu_gemm_size(probe_ms: float) -> int:
    """The GEMM-rate size on a CPU, from the time of a 512 x 512 x 512 GEMM: 2048, halved while a call would take
    more than GEMM_CALL_S. Without native bf16/fp16 those are emulated (bf16 at 1.2 GFLOP/s on an AVX2 AMD EPYC:
    16 s a call at 2048, 0.2 s at 512)."""
    n = 2048
    while n > 512 and probe_ms * (n / 512) ** 3 > GEMM_CALL_S * 1e3:
        n //= 2
    return n


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one large dense GEMM in `dtype` on `device`, measured now (the headline of 10, as everything)."""
    if device.type == "cuda":
        n = 8192
    else:
        probe = torch.randn(512, 512, dtype=dtype)
        n = cpu_gemm_size(time_ms(lambda: probe @ probe, device, warmup=1, repeats=3)[0])
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = time_ms(lambda: a @ b, device, warmup=2, repeats=10)
    return 2 * n**3 / (ms / 1e3)


def copy_bytes(device: torch.device) -> int:
    """The size of copy_bandwidth's source: 256 MiB, or the last-level cache where that is larger (a copy that
    fits in the cache measures the cache: 64 MiB copied at 33 GB/s on this project's Xeon, 256 MiB at 26)."""
    if device.type == "cuda":
        return 256 * 2**20
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()  # e.g. "491520K"
        cache = int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError):
        cache = 0
    return max(256 * 2**20, cache)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large tensor copy (read + write, both counted), measured now. Both tensors are written first:
    reading never-written memory reads the kernel's shared zero page, which runs from the cache (79 GB/s where
    the real copy moved 26)."""
    src = torch.ones(copy_bytes(device) // 4, device=device)
    dst = torch.zeros_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)

def summary_of(times: list[float]) -> tuple[float, list[float]]:
    """(headline, [p20, p50, p80]) of timings in ms; the quantiles interpolate between the rounds (the default
    `exclusive` method extrapolates past them, to below zero with 3 rounds)."""
    times = sorted(times)
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return headline(times), [quantiles[0], statistics.median(times), quantiles[-1]]

def ratio_standard_errors(times: dict[str, list[float]], pairs: list[tuple[str, str]], resamples: int = 200,
                          seed: int = 0) -> dict[tuple[str, str], float]:  # fmt: skip
    """(base, other) -> the standard error of headline(times[base]) / headline(times[other]), by a bootstrap over
    the rounds: the rounds resampled with replacement, the same rounds for every series (a round's calls ran side by
    side, so a slow minute that slowed all of them cancels in the ratio), the ratio recomputed each time.
    Every series in `pairs` must have the same number of rounds."""
    rounds = len(times[pairs[0][0]])
    draw = random.Random(seed)
    samples: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for _ in range(resamples):
        picked = [draw.randrange(rounds) for _ in range(rounds)]
        values = {name: headline([times[name][i] for i in picked]) for name in {n for p in pairs for n in p}}
        for base, other in pairs:
            samples[base, other].append(values[base] / values[other])
    return {pair: statistics.pstdev(values) for pair, values in samples.items()}


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
    # acc_events: one cycle either way; without it torch 2.11 warns that events of other cycles are dropped
    with torch.profiler.profile(activities=activities, profile_memory=True, acc_events=True) as prof:
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
