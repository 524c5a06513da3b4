"""`python -m convbert_fast info | demo`."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info() -> int:
    import torch
    import transformers

    import convbert_fast as cf

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # not installed, or broken
        triton_version = f"not available ({type(e).__name__}: {e})"
    print(f"convbert_fast  {cf.__version__}")
    print(f"python         {platform.python_version()}")
    print(f"torch          {torch.__version__}")
    print(f"transformers   {transformers.__version__}")
    print(f"triton         {triton_version}")
    print(f"CUDA (torch)   {torch.version.cuda or 'none (CPU build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device         cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print(f"device         cpu: {_cpu_name()}, {torch.get_num_threads()} threads (no CUDA device)")
    print(f"backend        {cf.get_backend()} (selected)")
    gaps = cf.ops.backend.device_gaps()
    for name, status in cf.available_backends().items():
        print(f"  {name:<8}     {status}")
        for (gap_backend, device_type), reason in gaps.items():
            if gap_backend == name and status == "ok":
                print(f"  {'':<8}     but not on {device_type}: {reason}")
    return 0


def demo(args) -> int:
    """Forward and forward+backward of a small built-in config, timed."""
    import torch

    import convbert_fast as cf
    from convbert_fast.configs import named_config

    torch.manual_seed(0)
    config = named_config(args.config, num_hidden_layers=args.layers, vocab_size=30522)
    model = cf.ConvBertForMaskedLM(config).to(args.device)
    input_ids = torch.randint(5, config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    labels = input_ids.clone()
    tokens = input_ids.numel()

    def timed(fn):
        times = []
        for i in range(args.repeats + 1):  # the first run warms up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def forward():
        with torch.no_grad():
            model(input_ids)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(input_ids, labels=labels).loss.backward()

    model.eval()
    forward_s = timed(forward)
    model.train()
    step_s = timed(train_step)
    print(
        f"ConvBertForMaskedLM, {args.config} shape with {args.layers} layers, batch {args.batch_size} x "
        f"{args.seq_len} tokens, {args.device}, fp32, backend {cf.get_backend()}"
    )
    print(f"  forward           {forward_s * 1e3:9.1f} ms   {tokens / forward_s:10.0f} tokens/s")
    print(f"  forward+backward  {step_s * 1e3:9.1f} ms   {tokens / step_s:10.0f} tokens/s")
    print(f"  (median of {args.repeats} runs after one warm-up)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convbert_fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and each backend's status")
    p = sub.add_parser("demo", help="time a forward and a training step of a small built-in model")
    p.add_argument("--config", default="small", choices=["small", "medium-small", "base"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; valid devices are cpu, cuda, cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: valid devices are cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: this torch ({torch.__version__}) sees no CUDA device")
    for name in ("layers", "batch_size", "seq_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
