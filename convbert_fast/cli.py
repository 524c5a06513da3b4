"""`python -m convbert_fast info | demo | bench | train | export`."""

from __future__ import annotations

import argparse
import sys


def info() -> int:
    import torch

    import convbert_fast as cf
    from convbert_fast import env, inference_weights

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
    kernels = isa["kernels"] or "none (convbert_fast._C not loaded)"
    used = isa["kernel_threads"]
    threads = f"on {used} of torch's {torch.get_num_threads()} threads; " if used else ""
    print(
        f"cpu kernels    {kernels} ({threads}ATen: {isa['torch_cpu_capability']}; bf16/fp16 "
        f"hardware: {', '.join(isa['low_precision']) or 'none'}; CONVBERT_FAST_CPU_ISA caps the kernels)"
    )
    packing = inference_weights.packing_problem()
    libraries = " or ".join(inference_weights.gemm_libraries()) if not packing else "MKL's or oneDNN's"
    print(f"cpu packing    {'off: ' + packing if packing else 'on'} (fp32 CPU inference GEMMs on weights packed by "
          f"{libraries}, the faster measured per shape; {inference_weights.GEMM_ENV}=mkl or onednn picks one, "
          f"{inference_weights.PACKING_ENV}=0 turns packing off)")
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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, `PROG: error: MESSAGE`, and exit status 2 (argparse prints its usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def bench_providers():
    from .bench.providers import PROVIDERS

    return list(PROVIDERS)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _choice_list(text: str, valid, expected: str) -> list[str]:
    """Comma-separated names, each of `valid`, at least one, without repeats; else `expected` says what fits."""
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or any(name not in valid for name in chosen):
        raise argparse.ArgumentTypeError(f"{text!r}: {expected}")
    return list(dict.fromkeys(chosen))


def _padding_list(text: str) -> list[str]:
    from .bench.providers import PADDINGS

    return _choice_list(text, PADDINGS, f"valid paddings are {', '.join(PADDINGS)}")


def _dtype_list(text: str) -> list[str]:
    return _choice_list(text, BENCH_DTYPES, "each of fp32, bf16, fp16, by commas")


BENCH_DTYPES = ("fp32", "bf16", "fp16")
# The adaptive rounds' budget: the seconds the whole run may take from its start (the op summary, rates, and every
# batch's compiles, warm-up, rounds and memory). A batch that would not finish its minimum of rounds
# (bench.providers.MIN_ROUNDS) in what is left is not measured, and says so: without that a default run took 649 s
# on our 2-core AVX2 AMD EPYC, every batch at the minimum, and the README's first command, install included, more
# than 10 minutes (README, "Benchmarks").
BENCH_TIME_BUDGET_S = 420.0


def bench(parser, args) -> int:
    from .data import UsageError

    try:
        return _bench(parser, args)
    except UsageError as e:  # a file named on the command line: missing, unreadable, not a record, not writable
        parser.error(str(e))


def _bench(parser, args) -> int:
    import torch

    from .bench import choose, record, report
    from .bench.providers import PROVIDERS
    from .data import check_writable

    if args.markdown:
        return report.markdown_main(args)
    if args.choose:
        return choose.choose_main(args.choose)
    if args.readme or args.check:
        parser.error("--readme and --check go with --markdown RECORD...")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):  # before measuring, not after
        if path:
            check_writable(path, flag)
    gpu = torch.cuda.is_available()
    valid_devices = ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if gpu else [])
    args.device = args.device or ("cuda" if gpu else "cpu")
    if args.device not in valid_devices:
        parser.error(f"--device {args.device!r} is not available here; valid: {', '.join(valid_devices)}")
    on_gpu = args.device.startswith("cuda")
    defaults = dict(
        dtype=["bf16"] if on_gpu else ["fp32"],
        layers=12 if on_gpu else 2,
        batch_size=32 if on_gpu else 8,
        seq_len=[[128, 256, 512, 1024, 2048, 4096]] if on_gpu else [[128, 256]],
        providers=",".join(PROVIDERS) if on_gpu
        else "transformers,transformers-compile,cpp,cpp-unpadded,onnxruntime-transformers",
        padding=["none", "half", "heavy"],
        warmup=3 if on_gpu else 1,
        time_budget=BENCH_TIME_BUDGET_S,
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
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if not args.seq_len or min(args.seq_len) < 1:
        parser.error(f"--seq-len: every length must be at least 1, got {args.seq_len}")
    if not args.time_budget > 0:
        parser.error(f"--time-budget must be positive, got {args.time_budget}")
    quiet_exporters()  # the ONNX Runtime and AOTInductor providers export their models first
    return record.run(args)


def load_checkpoint(path: str):
    """Our class of the checkpoint's architecture (ConvBertModel where it names none of ours), from_pretrained."""
    import json
    from pathlib import Path

    import convbert_fast as cf
    from convbert_fast.data import UsageError
    from convbert_fast.deploy.program import OUTPUT_NAMES

    config_file = Path(path) / "config.json"
    if not Path(path).is_dir() or not config_file.is_file():
        raise UsageError(f"{path} is not a checkpoint directory (save_pretrained's, with a config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{config_file} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(config, dict) or config.get("model_type") != "convbert":
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise UsageError(f"{path} is not a ConvBERT checkpoint: its config.json has model_type {model_type!r}")
    architecture = next((a for a in config.get("architectures") or () if a in OUTPUT_NAMES), "ConvBertModel")
    try:
        return getattr(cf, architecture).from_pretrained(path).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot load {architecture}: {str(e).strip().splitlines()[0]}") from None


def quiet_exporters() -> None:
    """Keeps the exporters' chatter off the terminal: transformers' loading bar, and what torch says about itself
    (deprecations inside torch.export, torch.onnx's axis names and its torchvision notes), not about the model."""
    import logging
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")


def export_command(args) -> int:
    """Checks every argument before any work, writes the artifact, then runs it against eager on a sample batch of
    another shape than the export's."""
    from pathlib import Path

    from .data import UsageError

    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"{out} is a directory; OUT is the file to write")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UsageError(f"the folder of {out} does not exist")
    suffix = ".onnx" if args.format == "onnx" else ".pt2"  # torch.export.load and aoti_load_package want .pt2
    if out.suffix != suffix:
        raise UsageError(f"--format {args.format} writes a {suffix} file, got {out.name}")
    import torch

    from . import deploy
    from .deploy import program

    problem = deploy.format_problem(args.format)
    if problem:
        raise UsageError(problem)
    quiet_exporters()
    model = load_checkpoint(args.checkpoint)
    deploy.export(model, args.format, out)
    size_mb = sum(f.stat().st_size for f in out.parent.glob(out.name + "*")) / 2**20  # onnx: + its .data file
    names = ", ".join(program.output_names(model))
    print(f"wrote {out} ({args.format}, {size_mb:.1f} MB): {type(model).__name__}, outputs {names}")
    if args.format == "onnx":
        print("run time: ONNX Runtime alone (inputs input_ids, attention_mask, token_type_ids: int64)")
    else:
        from .deploy import aoti

        library = aoti.op_library_path()
        print(f"run time: torch {torch.__version__.split('+')[0]}"
              + (f" with the op library {library} loaded first" if library else "")
              + (" (the package's C++ runtime: libtorch)" if args.format == "aoti" else ""))  # fmt: skip
    sample = program.sample_inputs(model, batch_size=3, seq_len=23, seed=1)
    diff = deploy.max_difference(model, deploy.load(args.format, out), sample)
    tolerance = deploy.TOLERANCE[args.format]
    shape = " x ".join(str(s) for s in sample[0].shape)
    verdict = "matches" if diff <= tolerance else "DIFFERS from"
    print(f"check: on a sample batch of {shape} tokens (one row padded) it {verdict} eager: max |difference| "
          f"{diff:.2e} (tolerance {tolerance:g}, fp32)")  # fmt: skip
    return 0 if diff <= tolerance else 1


def export_main(args) -> int:
    from .data import exit_status_of

    return exit_status_of("export", export_command, args)


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
    t.add_argument(
        "--packing",
        action="store_true",
        help="padding-free: each micro-batch's sequences packed into one row (masked-LM rows one document each, or "
        "the fine-tuning examples), the model in its padding-invariant mode, so no work goes to padding and no conv "
        "or attention crosses a sequence",
    )
    t.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (torchrun on CUDA GPUs)")
    t.add_argument("--backend", default="auto", choices=["auto", "eager", "cpp", "triton"])
    t.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when there is a GPU")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--eval-every", type=int, default=100, help="0: only at the end")
    t.add_argument("--save-every", type=int, default=0, help="0: only at the end")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m convbert_fast", description=__doc__)
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
    b.add_argument(
        "--dtype",
        type=_dtype_list,
        default=None,
        help="one or more of fp32, bf16, fp16, by commas, each measured in the same run (bf16/fp16: autocast); "
        "default: bf16 on a GPU, else fp32",
    )
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
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per batch; default: adaptive, at least 5 and then until every speed-up ratio's "
        "standard error is <= 0.01 or --time-budget is spent",
    )
    b.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"with adaptive rounds: what the run may take in all, warm-up and compilation included "
        f"(default {BENCH_TIME_BUDGET_S:.0f}); each batch gets a share of what is left in proportion to its cost, "
        f"and one that could not finish its minimum of rounds in what is left is not measured",
    )
    b.add_argument("--warmup", type=int, default=None)
    b.add_argument(
        "--padding",
        type=_padding_list,
        default=None,
        help="the batches at each length, comma-separated: none (full rows), half (row lengths uniform in [L/2, L], "
        "seeded, with an attention mask for both models), heavy (lengths in [8, L]); default: none,half,heavy",
    )
    b.add_argument("--no-pad", dest="padding", action="store_const", const=["none"], help="full rows only")
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
    e = sub.add_parser(
        "export",
        help="write a checkpoint as an exported program, AOTInductor package or ONNX, checked against eager",
        description="Writes the model of CHECKPOINT (a save_pretrained directory; its architecture's class, "
        "ConvBertModel if it names none) with inputs input_ids, attention_mask, token_type_ids (batch and sequence "
        "dynamic), then runs it against the eager model on a sample batch. Exit 1 if they differ beyond the "
        "format's tolerance, 2 on bad input.",
    )
    e.add_argument("checkpoint", metavar="CHECKPOINT")
    e.add_argument("--format", required=True, choices=["aoti", "onnx", "exported-program"])
    e.add_argument("out", metavar="OUT", help="the file to write (.pt2 for aoti and exported-program, .onnx)")
    e.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "train":
        from .train import main_or_exit

        return main_or_exit(args)
    if args.command == "export":
        return export_main(args)
    import torch

    if args.command == "bench":
        return bench(b, args)

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
