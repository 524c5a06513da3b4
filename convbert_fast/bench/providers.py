"""What the benchmark measures: the providers (transformers' model, ours under each backend, either compiled),
the batches they share, one provider's run on a batch (forward, training step, memory alone), every provider on
one batch taking turns, and the op summary (each op against its eager math)."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from . import deploy
from .timing import DynamoCounts, _timer, copy_bandwidth, cpu_peak_bytes, interleaved_ms, summary_of, tensor_bytes

PROVIDERS = {
    "transformers": "transformers' eager ConvBertModel",
    "transformers-compile": "torch.compile of transformers' model",
    "eager": "convbert_fast, backend eager (the transformers math)",
    "cpp": "convbert_fast, backend cpp",
    "triton": "convbert_fast, backend triton",
    "compile": "torch.compile of convbert_fast (backend auto)",
    "cpp-unpadded": "convbert_fast, backend cpp, padding-invariant mode (padded rows run unpadded)",
    **deploy.DEPLOY_PROVIDERS,
}
INFERENCE_ONLY = set(deploy.DEPLOY_PROVIDERS)  # timed on the forward only: no training step, no memory row
# Padded batches: each row's length drawn uniformly from [low(L), L], the rest padding, masked out.
PADDINGS = {"none": None, "half": lambda seq_len: (seq_len + 1) // 2, "heavy": lambda seq_len: min(8, seq_len)}
PADDING_ROWS = {"none": "all L", "half": "L/2..L", "heavy": "8..L"}
BASELINE, COMPILE_BASELINE = "transformers", "transformers-compile"


@dataclass
class Measurement:
    provider: str
    seq_len: int
    batch_size: int
    padded: bool = False  # rows of random lengths with an attention mask, else every row L tokens
    padding: str = "none"  # of PADDINGS: "half" lengths uniform in [L/2, L], "heavy" in [8, L]
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

    backend = provider.removesuffix("-unpadded")
    if backend in ("eager", "cpp", "triton"):
        status = cf.available_backends()[backend]
        if status != "ok":
            return status
        gap = cf.ops.backend.device_gaps().get((backend, device.type))
        if gap:
            return gap
        if provider == "triton" and device.type == "cpu":
            return "Triton on the CPU runs in its interpreter: not a speed to measure"
    return None

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

def make_batch(config, batch_size, seq_len, padding, device, seed=0):
    """(ids, attention_mask or None, real tokens): the same batch for every provider. Padded (PADDINGS): each
    row's length drawn uniformly from [low(L), L] by a generator seeded with `seed`, the rest padding, masked out."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=generator)
    if PADDINGS[padding] is None:
        return ids.to(device), None, batch_size * seq_len
    lengths = torch.randint(PADDINGS[padding](seq_len), seq_len + 1, (batch_size,), generator=generator)
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, config.pad_token_id or 0)
    return ids.to(device), mask.to(device), int(lengths.sum())

class ProviderRun:
    """One provider on one batch: its runner (compiled or not), optimizer and inputs, timed one call at a time
    so that `measure_batch` can interleave the providers round by round (a machine whose speed drifts then
    slows every provider alike instead of whichever ran during the slow minute)."""

    def __init__(self, provider, models, batch, device, autocast_dtype):
        theirs, ours = models
        self.provider, self.device = provider, device
        self.model = theirs if provider.startswith("transformers") else ours
        backend = provider.removesuffix("-unpadded")
        self.backend = backend if backend in ("eager", "cpp", "triton") else "auto"
        self.padding_invariant = provider.endswith("-unpadded")  # ours: the model is shared, the mode set per call
        # static shapes: a graph per batch shape and mode, as a fixed-shape training run would have (dynamo is
        # reset before each batch, so the recompile limit is never reached)
        self.compiled = provider.endswith("compile")
        self.runner = torch.compile(self.model, dynamic=False) if self.compiled else self.model
        self.phases = ("forward",) if provider in INFERENCE_ONLY else ("forward", "train_step")
        self.artifact = deploy.runner(provider, models, batch) if provider in INFERENCE_ONLY else None
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
        if self.artifact is not None:
            return self.artifact()
        self.model.config.padding_invariant = self.padding_invariant
        with torch.no_grad(), self._autocast():
            self.runner(self.ids, attention_mask=self.mask)

    def train_step(self):
        self.model.config.padding_invariant = self.padding_invariant
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
        result.inference_tokens_per_s = self.tokens / (result.forward_ms / 1e3)
        if "train_step" not in self.phases:
            return result
        result.train_step_ms, result.train_step_ms_quantiles = summary_of(self.times["train_step"])
        result.train_tokens_per_s = self.tokens / (result.train_step_ms / 1e3)
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


def measure_batch(providers, models, args, seq_len, padding, device, autocast_dtype, gemm_flops, train_flops,
                  progress):  # fmt: skip
    """Every provider on one batch (L tokens a row, or padded as PADDINGS[padding] says): warm-up calls, then
    `repeats` rounds that time
    each provider once per phase, then each provider's memory alone. A provider that fails (a compiler bug,
    say, or out of memory) is recorded as skipped with the error; it never ends the run."""
    torch._dynamo.reset()  # fresh graphs for this shape: the recompile limit counts per code object
    batch = make_batch(models[0].config, args.batch_size, seq_len, padding, device, seed=seq_len)
    measurements, runs = [], []

    def skip(provider, why):
        measurements.append(
            Measurement(provider, seq_len, args.batch_size, padding != "none", padding, batch[2], skipped=why)
        )
        progress.update(1)

    states = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in models}  # AdamW must not drift
    for provider in providers:
        problem = provider_problem(provider, device) or deploy.deploy_problem(provider, device, autocast_dtype)
        if problem:
            skip(provider, problem)
            continue
        try:
            run = ProviderRun(provider, models, batch, device, autocast_dtype)
            for phase in run.phases:
                for _ in range(args.warmup):
                    run.time(phase, record=False)
            runs.append(run)
        except Exception as error:  # noqa: BLE001  (reported in the record instead)
            skip(provider, failure(error))
    for phase in ("forward", "train_step"):
        for _ in range(args.repeats):
            for run in [run for run in runs if phase in run.phases]:
                try:
                    run.time(phase)
                except Exception as error:  # noqa: BLE001
                    runs.remove(run)
                    skip(run.provider, failure(error))
    for run in [run for run in runs if "train_step" in run.phases]:
        try:
            run.measure_memory([other for other in runs if other is not run])
        except Exception as error:  # noqa: BLE001
            runs.remove(run)
            skip(run.provider, failure(error))
    for run in runs:
        measurements.append(run.result(seq_len, args.batch_size, gemm_flops, train_flops))
        measurements[-1].padding = padding
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
