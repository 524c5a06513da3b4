"""`python -m convbert_fast info | demo | bench | train`."""

from __future__ import annotations

import argparse
import sys


def info() -> int:
    import torch

    import convbert_fast as cf
    from convbert_fast import env

    found = env.versions()
    print(f"convbert_fast  {cf.__version__}")
    print(f"python         {found['python']}")
    print(f"torch          {found['torch']}")
    print(f"transformers   {found['transformers']}")
    print(f"triton         {found['triton'] or f'not available ({env.triton_problem()})'}")
    print(f"CUDA (torch)   {found['cuda'] or 'none (CPU build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device         cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print(f"device         cpu: {env.cpu_name()}, {torch.get_num_threads()} threads (no CUDA device)")
    isa = env.cpu_isa()
    print(
        f"cpu kernels    {isa['kernels'] or 'none (convbert_fast._C not loaded)'} (ATen: {isa['aten']}; bf16/fp16 "
        f"hardware: {', '.join(isa['low_precision']) or 'none'}; CONVBERT_FAST_CPU_ISA caps the kernels)"
    )
    print(f"backend        {cf.get_backend()} (selected)")
    for name, (status, *gaps) in env.backend_status().items():
        print(f"  {name:<8}     {status}")
        for gap in gaps:
            print(f"  {'':<8}     {gap}")
    return 0


def demo(args) -> int:
    """Forward and forward+backward of a small built-in config, timed."""
    import torch

    import convbert_fast as cf
    from convbert_fast.bench.timing import time_ms
    from convbert_fast.configs import named_config

    torch.manual_seed(0)
    config = named_config(args.config, num_hidden_layers=args.layers, vocab_size=30522)
    model = cf.ConvBertForMaskedLM(config).to(args.device)
    input_ids = torch.randint(5, config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    labels = input_ids.clone()
    tokens = input_ids.numel()

    def timed(fn):  # median seconds after one warm-up run, as the benchmark times
        return time_ms(fn, torch.device(args.device), warmup=1, repeats=args.repeats)[0] / 1e3

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


def bench_providers():
    from .bench.providers import PROVIDERS

    return list(PROVIDERS)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def bench(parser, args) -> int:
    import torch

    from .bench import choose, record, report
    from .bench.providers import PROVIDERS

    if args.markdown:
        return report.markdown_main(args)
    if args.choose:
        return choose.choose_main(args.choose)
    if args.readme or args.check:
        parser.error("--readme and --check go with --markdown RECORD...")
    gpu = torch.cuda.is_available()
    valid_devices = ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if gpu else [])
    args.device = args.device or ("cuda" if gpu else "cpu")
    if args.device not in valid_devices:
        parser.error(f"--device {args.device!r} is not available here; valid: {', '.join(valid_devices)}")
    on_gpu = args.device.startswith("cuda")
    defaults = dict(
        dtype="bf16" if on_gpu else "fp32",
        layers=12 if on_gpu else 2,
        batch_size=32 if on_gpu else 8,
        seq_len=[[128, 256, 512, 1024, 2048, 4096]] if on_gpu else [[128, 256]],
        providers=",".join(PROVIDERS) if on_gpu else "transformers,transformers-compile,cpp",
        repeats=20 if on_gpu else 3,
        warmup=3 if on_gpu else 1,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.seq_len = [length for lengths in args.seq_len for length in lengths]  # "16,24 32" -> [16, 24, 32]
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in args.providers if p not in PROVIDERS]
    if unknown or not args.providers:
        parser.error(f"unknown provider(s) {unknown}; valid: {', '.join(PROVIDERS)}")
    for name in ("layers", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or any(length < 1 for length in args.seq_len):
        parser.error("--warmup must be >= 0 and every --seq-len >= 1")
    return record.run(args)


def add_train_parser(sub):
    t = sub.add_parser(
        "train",
        help="pretrain (masked LM or ELECTRA) or fine-tune a classifier on real text; torchrun runs it distributed",
        description="Defaults: masked-LM pretraining of a small ConvBERT (the `small` shape, 2 layers on the CPU, "
        "12 on a GPU) on the English prose of Python's own docs (pydoc_data.topics), a few minutes on a CPU.",
    )
    t.add_argument("--task", default="pretrain", choices=["pretrain", "cls"])
    t.add_argument("--objective", default="mlm", choices=["mlm", "electra"], help="pretraining objective")
    t.add_argument(
        "--train-file",
        help="pretrain: plain text, one document a line (default: the built-in corpus); "
        'cls: text<TAB>label lines, or a .jsonl of {"text", "label"}',
    )
    t.add_argument("--eval-file", help="cls: labelled examples to evaluate on (default: every 20th training example)")
    t.add_argument("--vocab", help="a vocab.txt (one WordPiece token a line, with [PAD] [UNK] [CLS] [SEP] [MASK])")
    t.add_argument("--vocab-size", type=int, default=4096, help="of the WordPiece tokenizer trained when no --vocab")
    t.add_argument(
        "--cache-dir", help="where trained tokenizers are cached (default ~/.cache/convbert_fast/tokenizers)"
    )
    t.add_argument("--config", default="small", help="small | medium-small | base | a config.json")
    t.add_argument(
        "--layers", type=int, default=None, help="default: 12 on a GPU, 2 on the CPU; a config.json's own number"
    )
    t.add_argument("--dropout", type=float, default=None, help="hidden and attention dropout (default: the config's)")
    t.add_argument("--init-from", help="start from this save_pretrained directory (e.g. a pretraining checkpoint)")
    t.add_argument("--resume", help="PATH of a checkpoint-N directory, or `latest` in --output-dir")
    t.add_argument("--output-dir", default="convbert_fast_run")
    t.add_argument("--max-steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=16, help="global: sequences per optimizer step, all processes")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --max-steps")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    t.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (torchrun on CUDA GPUs)")
    t.add_argument("--backend", default="auto", choices=["auto", "eager", "cpp", "triton"])
    t.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when there is a GPU")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--eval-every", type=int, default=100, help="0: only at the end")
    t.add_argument("--save-every", type=int, default=0, help="0: only at the end")


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
    b = sub.add_parser("bench", help="our ConvBERT against transformers' eager model and torch.compile of it")
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    b.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on a GPU, else fp32")
    b.add_argument("--config", default="base", choices=["small", "medium-small", "base"])
    b.add_argument("--layers", type=int, default=None, help="default: 12 on a GPU, 2 on the CPU")
    b.add_argument("--batch-size", type=int, default=None, help="default: 32 on a GPU, 8 on the CPU")
    b.add_argument(
        "--seq-len",
        type=_int_list,
        nargs="+",
        default=None,
        help="one or more, by spaces or commas (default: 128..4096 on a GPU, 128 256 on the CPU)",
    )
    b.add_argument("--providers", default=None, help="comma-separated, of: " + ", ".join(bench_providers()))
    b.add_argument(
        "--repeats", type=int, default=None, help="timed runs per measurement (default: 20 on a GPU, 3 on the CPU)"
    )
    b.add_argument("--warmup", type=int, default=None)
    b.add_argument(
        "--pad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="besides full rows, measure padded batches: lengths uniform in [L/2, L] (seeded), with an attention "
        "mask for both models (default: on)",
    )
    b.add_argument("--json", metavar="PATH", help="write the record here")
    b.add_argument("--plot", metavar="PATH", help="write a PNG of speed-up against sequence length here")
    b.add_argument(
        "--markdown",
        nargs="+",
        metavar="RECORD",
        help="measure nothing: write the README's performance tables from these JSON records (bench and "
        "breakdown records)",
    )
    b.add_argument(
        "--choose",
        metavar="OPS_RECORD",
        help="measure nothing: print MEASURED_CUDA_CHOICE's entries (cpp or triton per op) from a CUDA op-benchmark "
        "JSON (tools/gpu_check.sh's bench_ops.json)",
    )
    b.add_argument("--readme", metavar="PATH", help="with --markdown: rewrite the generated blocks of this file")
    b.add_argument("--check", action="store_true", help="with --readme: exit 1 if the file is not what it writes")
    add_train_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "train":
        from .train import main_or_exit

        return main_or_exit(args)
    import torch

    if args.command == "bench":
        return bench(parser, args)

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
