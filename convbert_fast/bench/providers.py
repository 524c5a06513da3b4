"""What the benchmark measures: the providers (transformers' model, ours under each backend, either compiled),
the batches they share, one provider's run on a batch (forward, training step, memory alone), every provider on
one batch taking turns, and the op summary (each op against its eager math)."""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field

import torch

from ..train import adamw
from . import deploy
from .timing import (
    DynamoCounts,
    _timer,
    cpu_peak_bytes,
    interleaved_ms,
    ratio_standard_errors,
    summary_of,
    tensor_bytes,
)

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
# the inference peer a user deploying a BERT-class encoder on a CPU weighs us against (issue 25)
ORT_BASELINE = "onnxruntime-transformers"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Adaptive rounds (no --repeats): at least MIN_ROUNDS, then more until every ratio of the table (each provider's
# forward and training step against transformers', transformers-compile's and ONNX Runtime's) has a bootstrap standard error of
# at most RATIO_SE_TARGET, or the batch's share of --time-budget is spent, or MAX_ROUNDS. Two runs then differ by
# a normal difference of SD sqrt(2) x 0.01, within 0.05 at 3.5 SDs, which leaves room for the dozen ratios a run has.
MIN_ROUNDS, MAX_ROUNDS, RATIO_SE_TARGET = 5, 60, 0.01
# On the CPU, a thread pool keeps its threads spinning after a call: ONNX Runtime's for 10-50 ms, OpenMP's (torch's)
# for a few. A call that follows another pool's then shares the cores with it. Measured here (Intel Xeon, 2 threads,
# B=1 L=128): our forward 47.9 ms right after an ONNX Runtime call, 35.6 after 10 ms, 21.4 after 50; ONNX Runtime
# 26.1 right after ours, 21.0 after 50 ms. So the rounds wait this long where the pool changes (every ONNX Runtime
# session has a pool of its own).
THREAD_POOL_SETTLE_S = 0.05
# But a core left idle that long is slow to start again (a VM's vCPU, a core's clock): our B=1 L=128 forward took
# 16.6 ms back to back and 20.8 after a 50 ms sleep. Only the calls after a pool change waited, always the same
# providers' (ONNX Runtime's, and the torch provider after it), which made them look slower than they are. So after
# the wait each provider is called once untimed, and every timed call follows a call that kept the cores busy.


@dataclass
class Measurement:
    provider: str
    seq_len: int
    batch_size: int
    padded: bool = False  # rows of random lengths with an attention mask, else every row L tokens
    padding: str = "none"  # of PADDINGS: "half" lengths uniform in [L/2, L], "heavy" in [8, L]
    tokens: int | None = None  # real (not padding) tokens per batch: what tokens/s count
    skipped: str | None = None  # why it could not run here
    dtype: str = "fp32"  # fp32, or the autocast dtype (bf16, fp16) over fp32 weights
    rounds: int | None = None  # timed rounds (each provider once per phase a round)
    ratio_se: dict | None = None  # "phase vs baseline" -> bootstrap standard error of that ratio (see MIN_ROUNDS)
    max_abs_diff: float | None = None  # the forward's output against transformers' eager model's, eval mode
    inference_only: bool = False  # no training step (the deploy providers): train figures are None, not zero
    forward_ms: float | None = None
    forward_ms_quantiles: list[float] = field(default_factory=list)  # p20, p50, p80
    forward_ms_rounds: list[float] = field(default_factory=list)  # every timed round, in order (0.001 ms)
    train_step_ms: float | None = None
    train_step_ms_quantiles: list[float] = field(default_factory=list)
    train_step_ms_rounds: list[float] = field(default_factory=list)
    # memory of one training step of this provider alone (see measure_memory)
    peak_memory_mb: float | None = None  # the step's peak: the larger of the two below
    forward_backward_peak_mb: float | None = None  # during forward + backward
    activation_memory_mb: float | None = None  # the forward + backward peak less weights, gradients, optimizer state
    optimizer_step_peak_mb: float | None = None  # during optimizer.step() (AdamW's scratch above its state)
    train_tokens_per_s: float | None = None
    inference_tokens_per_s: float | None = None
    train_flops: float | None = None
    gemm_rate_fraction: float | None = None  # model FLOP/s over the GEMM rate measured in the same run
    compiled: bool | None = None  # compiled providers: a graph for both phases and no frame left to eager
    dynamo: dict | None = None  # compiled providers: dynamo's counts per phase (see DynamoCounts)


def provider_problem(provider: str, device: torch.device, dtype: str = "fp32") -> str | None:
    """Why `provider` cannot run on `device` in `dtype`, or None."""
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
    return deploy.deploy_problem(provider, device, None if dtype == "fp32" else DTYPES[dtype])

def build_models(config, device, dtype):
    """transformers' model and ours with the same weights."""
    import transformers

    import convbert_fast as cf

    torch.manual_seed(0)
    theirs = transformers.ConvBertModel(config).to(device, dtype)
    ours = cf.ConvBertModel(config).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def frozen_copy(model):
    """A copy of `model` in eval mode with no parameter requiring a gradient: the forwards' model."""
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


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
        # the forward is inference: it runs on this provider's own copy, made before any training step, whose
        # weights no step moves, as the deploy providers' artifacts and a served model's are; ours then keeps its
        # derived weights across calls (inference_weights: a pack serves one row count, and cpp-unpadded's rows
        # are not cpp's)
        self.inference_model = None if provider in INFERENCE_ONLY else frozen_copy(self.model)
        backend = provider.removesuffix("-unpadded")
        self.backend = backend if backend in ("eager", "cpp", "triton") else "auto"
        self.padding_invariant = provider.endswith("-unpadded")  # ours: the model is shared, the mode set per call
        # static shapes: a graph per batch shape and mode, as a fixed-shape training run would have (dynamo is
        # reset before each batch, so the recompile limit is never reached)
        self.compiled = provider.endswith("compile")
        self.runner = torch.compile(self.model, dynamic=False) if self.compiled else self.model
        self.inference_runner = (
            torch.compile(self.inference_model, dynamic=False) if self.compiled else self.inference_model
        )  # (None for a deploy provider: its artifact runs the forward)
        self.phases = ("forward",) if provider in INFERENCE_ONLY else ("forward", "train_step")
        self.artifact = deploy.runner(provider, models, batch) if provider in INFERENCE_ONLY else None
        self.ids, self.mask, self.tokens = batch
        self.optimizer = adamw(self.model.parameters(), lr=1e-5)  # the same for every provider
        self.autocast_dtype = autocast_dtype
        # whose threads run it: torch's OpenMP pool, or the ONNX Runtime session's own
        self.thread_pool = provider if provider.startswith("onnxruntime") else "torch"
        self.times: dict[str, list[float]] = {"forward": [], "train_step": []}
        self.dynamo = {"forward": DynamoCounts(), "train_step": DynamoCounts()}
        self.memory_mb: dict[str, float | None] = {}
        self.measure = _timer(device)

    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def forward(self):
        if self.artifact is not None:
            return self.artifact()[0]
        self.inference_model.config.padding_invariant = self.padding_invariant
        # inference_mode, as a server runs a model: no autograd kernel runs at all (no_grad still enters each op's
        # autograd kernel, ours in Python: our B=1 L=128 forward 21.5 -> 20.9 ms, transformers' 23.4 either way)
        with torch.inference_mode(), self._autocast():
            return self.inference_runner(self.ids, attention_mask=self.mask).last_hidden_state

    def output(self) -> torch.Tensor:
        """The forward's output in eval mode, as fp32 (compared with transformers' eager model's)."""
        import convbert_fast as cf

        with cf.use_backend(self.backend):
            if not self.compiled:
                return self.forward().float()
            out = []  # a compile here (no warm-up) is counted like the timed calls' compiles
            self.dynamo["forward"].around(lambda: out.append(self.forward()))
            return out[0].float()

    def forward_backward(self):
        self.model.config.padding_invariant = self.padding_invariant
        with self._autocast():
            loss = self.runner(self.ids, attention_mask=self.mask).last_hidden_state.float().square().mean()
        loss.backward()

    def train_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward()
        self.optimizer.step()

    def time(self, phase: str, record: bool = True) -> None:
        import convbert_fast as cf

        with cf.use_backend(self.backend):
            self.model.train(True)  # the forward's model stays in eval mode
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
        if "train_step" not in self.phases:
            return
        """One more training step with only this provider's state in play: every other run's gradients and
        optimizer state freed, the allocator's cache emptied, each part's peak counted from where it starts.
        Forward + backward starts from this provider's weights, optimizer state and batch (gradients freed) and
        peaks with the activations and the gradients made so far; the optimizer step starts from those and the
        full gradients, and peaks with AdamW's scratch (which, at short lengths, exceeds the activations). A second
        model left resident holds neither, and is not counted. Activation memory is the forward + backward peak
        less weights, gradients and optimizer state."""
        import convbert_fast as cf

        for run in others:
            if "train_step" in run.phases:  # not a deploy provider's, which holds no training state
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
            above_forward_backward = self._peak_above(self.forward_backward)
            above_optimizer = self._peak_above(self.optimizer.step)
        forward_backward = weights + state + batch + above_forward_backward
        optimizer = weights + state + batch + grads + above_optimizer
        mb = {"forward_backward": forward_backward, "optimizer": optimizer, "step": max(forward_backward, optimizer),
              "activations": forward_backward - weights - grads - state}  # fmt: skip
        self.memory_mb = {k: v / 2**20 for k, v in mb.items()}

    def _peak_above(self, fn) -> int:
        """The most bytes allocated above the level at the start while `fn` ran."""
        if self.device.type != "cuda":
            return cpu_peak_bytes(fn)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - start

    def result(self, seq_len, batch_size, gemm_flops, train_flops) -> Measurement:
        result = Measurement(self.provider, seq_len, batch_size, padded=self.mask is not None, tokens=self.tokens)
        result.peak_memory_mb = self.memory_mb.get("step")
        result.forward_backward_peak_mb = self.memory_mb.get("forward_backward")
        result.activation_memory_mb = self.memory_mb.get("activations")
        result.optimizer_step_peak_mb = self.memory_mb.get("optimizer")
        result.forward_ms, result.forward_ms_quantiles = summary_of(self.times["forward"])
        result.forward_ms_rounds = [round(ms, 3) for ms in self.times["forward"]]
        result.inference_tokens_per_s = self.tokens / (result.forward_ms / 1e3)
        if "train_step" not in self.phases:
            result.inference_only = True
            return result
        result.train_step_ms, result.train_step_ms_quantiles = summary_of(self.times["train_step"])
        result.train_step_ms_rounds = [round(ms, 3) for ms in self.times["train_step"]]
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


def ratio_pairs(runs) -> list[tuple[str, str]]:
    """The ratios the table shows, as (baseline series, provider series) with series named "provider phase":
    every provider's phases against transformers', transformers-compile's and ONNX Runtime's, where both ran."""
    series = {f"{run.provider} {phase}" for run in runs for phase in run.phases}
    return [(f"{base} {phase}", f"{run.provider} {phase}") for run in runs for phase in run.phases
            for base in (BASELINE, COMPILE_BASELINE, ORT_BASELINE)
            if run.provider != base and f"{base} {phase}" in series]  # fmt: skip


def measure_batch(providers, models, args, seq_len, padding, device, dtype, gemm_flops, train_flops, progress,
                  budget_s=None, clock=None):  # fmt: skip
    """Every provider on one batch (L tokens a row, or padded as PADDINGS[padding] says) in one dtype: warm-up calls, the forward's output
    against transformers', then rounds that time each provider once per phase (the order rotating round by round),
    then each provider's memory alone. Rounds: --repeats if given, else adaptive (see MIN_ROUNDS) within
    `budget_s` seconds from the start of this call, compiles and warm-ups included. A provider that fails (a
    compiler bug, say, or out of memory) is recorded as skipped with the error; it never ends the run. `clock`, a
    dict, is given the seconds of everything but the rounds (`setup_s`), of a round (`round_s`) and of what follows
    the rounds (`after_s`); a round is added only if the batch would still end within `budget_s`, with what
    follows the rounds taking as long as the last batch's did (`clock`'s `after_s` when called)."""
    torch._dynamo.reset()  # fresh graphs for this shape: the recompile limit counts per code object
    batch = make_batch(models[0].config, args.batch_size, seq_len, padding, device, seed=seq_len)
    padded = padding != "none"
    autocast_dtype = None if dtype == "fp32" else DTYPES[dtype]
    measurements, runs = [], []
    began = time.perf_counter()  # the budget counts this batch's compiles and warm-ups too

    def skip(provider, why):
        measurements.append(
            Measurement(provider, seq_len, args.batch_size, padded, padding, batch[2], skipped=why, dtype=dtype)
        )
        progress.update(1)

    states = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in models}  # AdamW must not drift
    # transformers' eager forward in eval mode, before any training step has moved a weight: each provider's
    # output is compared with it on the real tokens (the deploy artifacts hold the weights every batch starts
    # from); the padding-invariant providers' with our eager backend's in that mode, whose real tokens differ
    # from transformers' by design
    references = {}

    def reference(provider):
        mode = provider.endswith("-unpadded")
        if mode not in references:
            try:
                references[mode] = ProviderRun("eager-unpadded" if mode else BASELINE, models, batch, device,
                                               autocast_dtype).output()  # fmt: skip
            except Exception as error:  # noqa: BLE001  (out of memory, say: no comparison, the timings still run)
                references[mode] = None
                print(f"WARNING: the reference forward failed ({failure(error)}): no output comparison at "
                      f"L={seq_len}", file=sys.stderr)  # fmt: skip
        return references[mode]

    def max_abs_diff(provider, output):
        expected = reference(provider)
        if expected is None:
            return None
        diff = (output - expected).abs()
        if batch[1] is not None:  # the padding's outputs are nobody's answer
            diff = diff.masked_fill(batch[1][..., None] == 0, 0.0)
        return diff.max().item()

    for provider in providers:
        problem = provider_problem(provider, device, dtype)
        if problem:
            skip(provider, problem)
            continue
        try:
            run = ProviderRun(provider, models, batch, device, autocast_dtype)
            run.max_abs_diff = max_abs_diff(provider, run.output())
            runs.append(run)
        except Exception as error:  # noqa: BLE001  (reported in the record instead)
            skip(provider, failure(error))
    for run in list(runs):
        try:
            for phase in run.phases:
                for _ in range(args.warmup):
                    run.time(phase, record=False)
        except Exception as error:  # noqa: BLE001
            runs.remove(run)
            skip(run.provider, failure(error))
    rounds, ses = 0, {}
    pool = runs[-1].thread_pool if runs else None  # the last call's: its output check or warm-up
    rounds_began = time.perf_counter()
    after_s = (clock or {}).get("after_s", 0.0)  # the memory measurement after the rounds, as the last batch's took

    def ends_at(planned):  # seconds from `began` to this batch's end with `planned` rounds (at their mean so far)
        return rounds_began - began + planned * (time.perf_counter() - rounds_began) / rounds + after_s

    while runs:
        for run in runs[rounds % len(runs):] + runs[: rounds % len(runs)]:
            settle = device.type == "cpu" and pool != run.thread_pool
            pool = run.thread_pool
            if settle:
                time.sleep(THREAD_POOL_SETTLE_S)  # the other pool's threads stop spinning
            for phase in run.phases:
                try:
                    if settle and phase == run.phases[0]:
                        run.time(phase, record=False)  # the cores awake again (see THREAD_POOL_SETTLE_S)
                    run.time(phase)
                except Exception as error:  # noqa: BLE001
                    runs.remove(run)
                    skip(run.provider, failure(error))
                    break
        rounds += 1  # a provider that failed is gone: the others all ran this round
        pairs = ratio_pairs(runs)
        if pairs and rounds > 1:
            series = {f"{run.provider} {phase}": run.times[phase] for run in runs for phase in run.phases}
            ses = ratio_standard_errors(series, pairs)
        if args.repeats:
            if rounds >= args.repeats:
                break
        elif rounds >= MAX_ROUNDS or rounds >= MIN_ROUNDS and (
            max(ses.values(), default=0.0) <= RATIO_SE_TARGET or ends_at(rounds + 1) > (budget_s or 0)
        ):
            break
    rounds_s = time.perf_counter() - rounds_began
    memory_began = time.perf_counter()
    for run in list(runs):
        try:
            run.measure_memory([other for other in runs if other is not run])
        except Exception as error:  # noqa: BLE001
            runs.remove(run)
            skip(run.provider, failure(error))
    for run in runs:
        m = run.result(seq_len, args.batch_size, gemm_flops, train_flops)
        m.dtype, m.rounds, m.max_abs_diff, m.padding = dtype, rounds, run.max_abs_diff, padding
        m.ratio_se = {f"{other.split(' ')[1]} vs {base.split(' ')[0]}": round(se, 4)
                      for (base, other), se in ses.items() if other.split(" ")[0] == run.provider} or None  # fmt: skip
        measurements.append(m)
        progress.update(1)
    for model in models:
        model.load_state_dict(states[id(model)])
    if clock is not None:
        clock.update(setup_s=time.perf_counter() - began - rounds_s, round_s=rounds_s / max(rounds, 1),
                     after_s=time.perf_counter() - memory_began)  # fmt: skip
    order = {p: i for i, p in enumerate(providers)}
    return sorted(measurements, key=lambda m: order[m.provider])


def span_conv_bytes(values, logits) -> int:
    """Bytes a fused span conv must move in forward + backward: the forward reads values and logits and writes
    the output; the backward reads the gradient, values and logits and writes both gradients."""
    return values.element_size() * (5 * values.numel() + 3 * logits.numel())


def ops_summary(device, dtype, warmup, repeats, copy_bytes_per_s) -> dict:
    """Each op forward + backward at the shapes of the issues (B=8 on the CPU, 32 on a GPU; L=512; 6 conv heads
    of 64, K=9, separable conv 768 -> 384, grouped linear 384 -> 1536 in 2 groups): the `eager` backend (the
    seed's code, step for step, as transformers runs it) against the best backend here, all of them taking
    turns round by round; and the share of the copy bandwidth (measured in the same run) the span conv reaches."""
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
    result["dynamic_span_conv"]["bandwidth_fraction"] = span_conv_bytes(values, logits) / seconds / copy_bytes_per_s
    return result
