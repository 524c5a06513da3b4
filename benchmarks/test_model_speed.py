"""The whole encoder (ConvBertModel): forward, backward and forward + backward, per provider and config.

    pytest benchmarks/test_model_speed.py --benchmark-only --benchmark-group-by=group   (--bench-device cuda)

Providers as in `python -m convbert_fast bench`: transformers' eager model and torch.compile of it, and ours
with each backend and compiled. On the CPU: fp32, 2 layers, B=8, L=256; on a GPU: bf16 autocast, 12 layers,
B=32, L=512 (`--bench-size tiny`: one small layer, for CI's smoke run).
"""

from __future__ import annotations

import pytest
import torch

import convbert_fast as cf
from convbert_fast.bench.providers import INFERENCE_ONLY, PROVIDERS, build_models, provider_problem
from convbert_fast.configs import named_config

PHASES = ["forward", "backward", "forward+backward"]


@pytest.fixture(scope="module")
def model_cache():
    return {}


def settings(device, tiny):
    if tiny:
        return dict(layers=1, batch=1, seq_len=8, autocast=None)
    on_gpu = device.type == "cuda"
    return dict(
        layers=12 if on_gpu else 2,
        batch=32 if on_gpu else 8,
        seq_len=512 if on_gpu else 256,
        autocast=torch.bfloat16 if on_gpu else None,
    )


@pytest.mark.parametrize("phase", PHASES)
# the deploy providers are inference-only artifacts: `python -m convbert_fast bench` times them, export included
@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p not in INFERENCE_ONLY])
@pytest.mark.parametrize("config_name", ["base", "medium-small", "small"])
def test_model(benchmark, config_name, provider, phase, device, tiny, model_cache):
    if tiny and config_name != "small":
        pytest.skip("the smoke run covers one config")
    problem = provider_problem(provider, device)
    if problem and not (tiny and provider == "triton"):  # tiny: triton runs in the interpreter
        pytest.skip(problem)
    s = settings(device, tiny)
    key = (config_name, s["layers"])
    if key not in model_cache:
        config = named_config(config_name, num_hidden_layers=s["layers"])
        model_cache[key] = build_models(config, device, torch.float32)
    theirs, ours = model_cache[key]
    model = theirs if provider.startswith("transformers") else ours
    runner = torch.compile(model, dynamic=False) if provider.endswith("compile") else model
    backend = provider if provider in ("eager", "cpp", "triton") else "auto"
    ids = torch.randint(5, model.config.vocab_size, (s["batch"], s["seq_len"]), device=device)
    autocast = torch.autocast(device.type, dtype=s["autocast"], enabled=s["autocast"] is not None)
    benchmark.group = f"{config_name} {phase}"
    model.train(phase != "forward")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def loss():
        with autocast:
            return runner(ids).last_hidden_state.float().square().mean()

    with cf.use_backend(backend):
        if phase == "forward":

            def target():
                with torch.no_grad():
                    loss()
                sync()

            target()
            benchmark.pedantic(target, rounds=5, iterations=1, warmup_rounds=1)
        elif phase == "backward":

            def setup():  # the forward, finished before the backward's clock starts
                model.zero_grad(set_to_none=True)
                value = loss()
                sync()
                return (value,), {}

            def target(value):
                value.backward()
                sync()

            target(*setup()[0])
            benchmark.pedantic(target, setup=setup, rounds=5, warmup_rounds=1)
        else:

            def target():
                model.zero_grad(set_to_none=True)
                loss().backward()
                sync()

            target()
            benchmark.pedantic(target, rounds=5, iterations=1, warmup_rounds=1)
