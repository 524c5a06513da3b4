"""The benchmark's reports: the table printed at the end of a run, the plot, and the README's performance tables
written from committed records (`bench --markdown RECORD... --readme README.md`; a test checks that the README
holds exactly what this writes)."""

from __future__ import annotations

import re
import sys
from dataclasses import asdict
from pathlib import Path

from ..data import UsageError, check_writable, read_json, read_text
from .providers import BASELINE, COMPILE_BASELINE, ORT_BASELINE, PADDING_ROWS, Measurement


def _ratio(a, b):
    return None if a is None or b is None else a / b

def provider_label(m) -> str:
    """The provider as tables show it: a compiled provider that left any frame to eager says so."""
    m = m if isinstance(m, dict) else asdict(m)
    return m["provider"] + (" (NOT compiled: fell back to eager)" if m.get("compiled") is False else "")


def padding_of(m) -> str:
    """A measurement's padding (PADDINGS); records from before heavy padding have only `padded`."""
    return m.get("padding") or ("half" if m["padded"] else "none")


def _by_batch(measurements, dtype="fp32"):
    """(dtype, L, padding) -> {provider: measurement}; measurements of records from before several dtypes a run
    (which had no `dtype` field) take `dtype`, the run's."""
    by_batch: dict[tuple, dict] = {}
    for m in measurements:
        by_batch.setdefault((m.get("dtype") or dtype, m["seq_len"], padding_of(m)), {})[m["provider"]] = m
    return by_batch


def _fmt(value, spec, suffix=""):
    """`value` in `spec` with `suffix`, or "-" as wide (a table's missing cell keeps its column)."""
    if value is None:
        width = re.match(r"[<>^]?(\d*)", spec)[1]
        return f"{'-':>{int(width) + len(suffix)}}" if width else "-"
    return f"{value:{spec}}{suffix}"


INFERENCE_ONLY = "inference only: no training step"


def table(measurements: list[Measurement]) -> str:
    rows = [
        f"{'dtype':<5} {'L':>5} {'pad':>5} {'provider':<24} {'fwd ms':>9} {'train ms':>9} {'train tok/s':>12} "
        f"{'fwd x eager':>11} {'train x eager':>13} {'fwd x compile':>13} {'train x compile':>15} {'fwd x ORT':>9} "
        f"{'fwd+bwd MB':>10} {'act MB':>7} {'optim MB':>8} {'GEMM rate':>9} {'fwd diff':>8}"
    ]
    for (dtype, seq_len, padding), at in _by_batch([asdict(m) for m in measurements]).items():
        base, compiled, ort = at.get(BASELINE), at.get(COMPILE_BASELINE), at.get(ORT_BASELINE)
        ort = ort if ort and not ort["skipped"] else None
        for m in at.values():
            lead = f"{dtype:<5} {seq_len:>5} {padding:>5} {provider_label(m):<24}"
            if m["skipped"]:
                rows.append(f"{lead} skipped: {m['skipped']}")
                continue
            rows.append(
                f"{lead} {m['forward_ms']:>9.1f} {_fmt(m['train_step_ms'], '>9.1f')} "
                f"{_fmt(m['train_tokens_per_s'], '>12.0f')} "
                f"{_fmt(_ratio(base and base['forward_ms'], m['forward_ms']), '>10.2f', 'x')} "
                f"{_fmt(_ratio(base and base['train_step_ms'], m['train_step_ms']), '>12.2f', 'x')} "
                f"{_fmt(_ratio(compiled and compiled['forward_ms'], m['forward_ms']), '>12.2f', 'x')} "
                f"{_fmt(_ratio(compiled and compiled['train_step_ms'], m['train_step_ms']), '>14.2f', 'x')} "
                f"{_fmt(_ratio(ort and ort['forward_ms'], m['forward_ms']), '>8.2f', 'x')} "
                f"{_fmt(m['forward_backward_peak_mb'], '>10.0f')} {_fmt(m['activation_memory_mb'], '>7.0f')} "
                f"{_fmt(m['optimizer_step_peak_mb'], '>8.0f')} "
                f"{_fmt(m['gemm_rate_fraction'] and 100 * m['gemm_rate_fraction'], '>8.1f', '%')} "
                f"{_fmt(m['max_abs_diff'], '>8.1e')}" + (f"  {INFERENCE_ONLY}" if m["inference_only"] else "")
            )
    return "\n".join(rows)


def plot(measurements: list[Measurement], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [m for m in measurements if not m.skipped and m.train_step_ms is not None]
    base = {(m.dtype, m.seq_len, m.padding): m.train_step_ms for m in done if m.provider == BASELINE}
    dtypes = list(dict.fromkeys(m.dtype for m in measurements))
    styles = {"none": "-", "half": "--", "heavy": ":"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dtype in dtypes:
        for provider in dict.fromkeys(m.provider for m in measurements):
            for padding, style in styles.items():
                points = sorted(
                    (m.seq_len, base[dtype, m.seq_len, padding] / m.train_step_ms)
                    for m in done
                    if (m.provider, m.dtype, m.padding) == (provider, dtype, padding)
                    and (dtype, m.seq_len, padding) in base
                )
                if points:
                    label = (provider + (f" {dtype}" if len(dtypes) > 1 else "")
                             + ("" if padding == "none" else f", rows {PADDING_ROWS[padding]}"))  # fmt: skip
                    ax.plot(*zip(*points), marker="o", linestyle=style, label=label)
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



OURS = {
    "eager": "ours, `eager`",
    "cpp": "ours, `cpp`",
    "triton": "ours, `triton`",
    "compile": "ours, compiled",
    "cpp-unpadded": "ours, `cpp`, padding-invariant (unpadded)",
    "aoti": "ours, AOTInductor package",
    "onnxruntime-ours": "ours, ONNX Runtime",
    "onnxruntime-transformers": "transformers, ONNX Runtime",
}
README_BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def _source(record, path) -> str:
    versions_ = record["versions"]
    dirty = {True: "uncommitted changes", False: "clean tree", None: "tree state unknown"}[record.get("git_dirty")]
    commit = (record.get("git_commit") or "unknown")[:10]
    return (
        f"Record `{path}`: {record['device']}, torch {versions_['torch']}, transformers {versions_['transformers']}, "
        f"{record['date'][:10]}, commit `{commit}` ({dirty})."
    )


def _rounds(record) -> str:
    """How many rounds each time took: the fixed --repeats, or the adaptive range and its rule."""
    s = record["settings"]
    if s.get("repeats"):
        return f"{_statistic(record)} of {s['repeats']} rounds"
    taken = sorted({m["rounds"] for m in record["measurements"] if m.get("rounds")})
    span = f"{taken[0]} to {taken[-1]}" if taken and taken[0] != taken[-1] else f"{taken[0] if taken else 0}"
    return f"{_statistic(record)} of {span} rounds ({record['rounds_rule']})"


def _statistic(record) -> str:
    """What a record's times are: 20th percentiles of the rounds (records without the field: medians)."""
    quantile = record.get("headline_quantile")
    return "medians" if quantile in (None, 0.5) else f"{round(quantile * 100)}th percentiles"


def _isa(record) -> str:
    isa = record.get("cpu_isa")
    if not isa:
        return ""
    native = [name for name, key in (("AMX", "amx"), ("AVX512-BF16", "avx512_bf16")) if isa.get(key)]
    return (f" CPU ISA: torch's {isa['torch_cpu_capability']} kernels; native bf16: "
            f"{' and '.join(native) if native else 'none'}.")  # fmt: skip


def _optimizer(record) -> str:
    # records before fused AdamW had torch's CPU default, the for-loop (166 ms a step here against 26 fused)
    return f"`{record.get('optimizer', 'torch.optim.AdamW()')}`"


def model_markdown(record, path) -> str:
    s = record["settings"]
    dtypes = s["dtype"] if isinstance(s["dtype"], list) else [s["dtype"]]
    measured = [m for m in record["measurements"] if not m["skipped"]]
    with_ort = any(m["provider"] == ORT_BASELINE for m in measured)
    lines = [
        f"ConvBERT-{s['config']} encoder with {s['layers']} layer{'s' if s['layers'] != 1 else ''}, "
        f"B={s['batch_size']}, {', '.join(dtypes)} (bf16/fp16: autocast over fp32 weights): {_rounds(record)}, in "
        f"which the providers take turns; a training step ends with {_optimizer(record)} (every provider's); padded rows draw each row's length uniformly from [L/2, L] (or [8, L]) and "
        "pass the attention mask to every model; tokens/s counts real tokens; memory is one training step of the provider "
        f"alone ({record['memory_tool']}): the peak of forward + backward, the activations (that peak less "
        "weights, gradients and AdamW state) and the peak of the optimizer step (AdamW's scratch), `-` where the "
        "record does not hold them apart; the output difference is the largest |forward output - transformers' "
        "eager forward output| in the same dtype over the real tokens (the padding-invariant mode's: against our `eager` "
        "backend in that mode, since its real tokens differ from transformers' by design)." + _isa(record) + " " + _source(record, path) + _incomplete(record),
        "",
        "| dtype | L | rows | provider | forward | training step | train tokens/s | forward vs transformers "
        "| step vs transformers | step vs transformers-compile | " + ("forward vs ONNX Runtime | " if with_ort else "")
        + "forward + backward peak | activations | optimizer step peak | output difference |",
        "|---" * (14 + with_ort) + "|",
    ]
    for (dtype, seq_len, padding), at in _by_batch(record["measurements"], dtypes[0]).items():
        base, compiled, ort = at.get(BASELINE), at.get(COMPILE_BASELINE), at.get(ORT_BASELINE)
        ort = ort if ort and not ort["skipped"] else None
        rows = PADDING_ROWS[padding] + ("" if padding == "none" else ", masked")
        for m in at.values():
            label = provider_label({**m, "provider": OURS.get(m["provider"], m["provider"])})
            lead = f"| {dtype} | {seq_len} | {rows} | {label} | "
            if m["skipped"]:
                lines.append(lead + f"skipped: {m['skipped']} |" + "|" * (9 + with_ort))
                continue
            train = m["train_step_ms"] is not None
            cells = [
                f"{m['forward_ms']:.1f} ms",
                f"{m['train_step_ms']:.1f} ms" if train else INFERENCE_ONLY,
                _fmt(m["train_tokens_per_s"], ".0f"),
                _fmt(_ratio(base and base["forward_ms"], m["forward_ms"]), ".2f", "x"),
                _fmt(_ratio(base and base["train_step_ms"], m["train_step_ms"]), ".2f", "x"),
                _fmt(_ratio(compiled and compiled["train_step_ms"], m["train_step_ms"]), ".2f", "x"),
                *([_fmt(_ratio(ort and ort["forward_ms"], m["forward_ms"]), ".2f", "x")] if with_ort else []),
                _fmt(m.get("forward_backward_peak_mb"), ".1f", " MB"),
                _fmt(m.get("activation_memory_mb") if "forward_backward_peak_mb" in m else None, ".1f", " MB"),
                _fmt(m.get("optimizer_step_peak_mb"), ".1f", " MB"),
                _fmt(m.get("max_abs_diff"), ".1e"),
            ]
            lines.append(lead + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DEPLOY_ROWS = ("transformers", ORT_BASELINE, "cpp", "compile", "aoti", "onnxruntime-ours")


def _forward_ms(m):
    return None if m is None or m["skipped"] else m["forward_ms"]


def deploy_markdown(record, path) -> str:
    """Inference of each deployed form of ours against transformers' eager model and ONNX Runtime on transformers'
    graph, from the deploy rows of a bench record (a sentence where it has none)."""
    s = record["settings"]
    measured = [m for m in record["measurements"] if m["provider"] in DEPLOY_ROWS and m.get("dtype", "fp32") == "fp32"]
    if not any(m["provider"] in ("aoti", "onnxruntime-ours") for m in measured):
        return (f"No deploy provider ran for `{path}`: `python -m convbert_fast bench --providers "
                f"{','.join(DEPLOY_ROWS)}` measures them. {_source(record, path)}\n")  # fmt: skip
    lines = [
        f"ConvBERT-{s['config']} encoder with {s['layers']} layer{'s' if s['layers'] != 1 else ''}, "
        f"B={s['batch_size']}, fp32, inference (a forward under torch.inference_mode; artifacts checked against their "
        f"model on every batch): {_rounds(record)}, in which the providers take turns; padded rows "
        "pass the attention mask. " + _source(record, path) + _incomplete(record),
        "",
        "| L | rows | provider | forward | tokens/s | vs transformers | vs ONNX Runtime on transformers' graph |",
        "|---|---|---|---|---|---|---|",
    ]
    for (_, seq_len, padding), at in _by_batch(measured).items():
        base, ort_base = (_forward_ms(at.get(name)) for name in (BASELINE, ORT_BASELINE))
        rows = PADDING_ROWS[padding] + ("" if padding == "none" else ", masked")
        for provider in DEPLOY_ROWS:
            m = at.get(provider)
            if m is None:
                continue
            label = OURS.get(provider, provider)
            if m["skipped"]:
                lines.append(f"| {seq_len} | {rows} | {label} | skipped: {m['skipped']} ||||")
                continue
            ms = m["forward_ms"]
            cells = [f"{ms:.1f} ms", f"{m['inference_tokens_per_s']:.0f}",
                     _fmt(_ratio(base, ms), ".2f", "x"), _fmt(_ratio(ort_base, ms), ".2f", "x")]
            lines.append(f"| {seq_len} | {rows} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _incomplete(record) -> str:
    """A sentence for a record whose run ended early (records from before `complete` existed were complete)."""
    return "" if record.get("complete", True) else f" **Incomplete run: {record['stopped'] or 'stopped early'}.**"


def ops_markdown(record, path) -> str:
    ops = record["ops"]
    ops = [ops] if isinstance(ops, dict) else ops or []  # one dict in records from before several dtypes a run
    if not ops:
        return f"Not measured: the run stopped first. {_source(record, path)}{_incomplete(record)}\n"
    first = ops[0]
    repeats = record["settings"].get("repeats") or record.get("ops_repeats")
    bandwidth = record.get("copy_bandwidth_gbps")
    lines = [
        f"Each op forward + backward, B={first['batch_size']}, L={first['seq_len']}, 6 conv heads of 64, K=9: the "
        f"`eager` backend (the seed's code as transformers runs it) against `{first['backend']}`, taking turns, "
        f"{_statistic(record)} of {repeats} rounds"
        + (f"; the span conv's bytes moved per second against a copy's, {bandwidth:.1f} GB/s here" if bandwidth else "")
        + ". " + _source(record, path),
        "",
        f"| op | dtype | `eager` (transformers' code) | `{first['backend']}` | speed-up |",
        "|---|---|---|---|---|",
    ]
    shapes = {
        "dynamic_span_conv": "`dynamic_span_conv` (eager: the unfold path)",
        "separable_conv1d": "`separable_conv1d` (768 -> 384, times the query; eager: with the transposes)",
        "grouped_linear": "`grouped_linear` (384 -> 1536, 2 groups)",
    }
    for op, name in shapes.items():
        for by_dtype in ops:
            o = by_dtype[op]
            share = ""
            if bandwidth and "bandwidth_fraction" in o:
                share = f" ({100 * o['bandwidth_fraction']:.0f}% of the copy's bandwidth)"
            lines.append(f"| {name} | {by_dtype['dtype']} | {o['eager_ms']:.1f} ms | {o['ms']:.1f} ms{share} | "
                         f"{o['vs_eager']:.2f}x |")  # fmt: skip
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
    """README block name -> its markdown, from bench records (blocks `model`, `ops`, `deploy`) and breakdown records
    (`breakdown`), in the order given."""
    parts: dict[str, list[str]] = {}
    for path in paths:
        record = read_json(path, "--markdown record")
        known = isinstance(record, dict) and ("breakdown_ms" in record or {"measurements", "settings"} <= set(record))
        if not known:
            raise UsageError(f"--markdown record {path} is neither a bench record nor a breakdown record")
        if "breakdown_ms" in record:
            parts.setdefault("breakdown", []).append(breakdown_markdown(record, path))
        else:
            parts.setdefault("model", []).append(model_markdown(record, path))
            parts.setdefault("ops", []).append(ops_markdown(record, path))
            parts.setdefault("deploy", []).append(deploy_markdown(record, path))
    return {name: "\n".join(texts) for name, texts in parts.items()}


def render_readme(text: str, blocks: dict[str, str]) -> str:
    """`text` with each `<!-- bench:NAME -->` ... `<!-- /bench:NAME -->` block's body replaced by blocks[NAME]."""
    found = [m["name"] for m in README_BLOCK.finditer(text)]
    if sorted(found) != sorted(blocks):
        raise UsageError(f"the README's generated blocks {found} are not the records' blocks {sorted(blocks)}")
    return README_BLOCK.sub(lambda m: m[1] + blocks[m["name"]] + m[4], text)


def markdown_main(args) -> int:
    blocks = markdown_blocks(args.markdown)
    if not args.readme:
        print("\n".join(f"<!-- bench:{name} -->\n{body}<!-- /bench:{name} -->" for name, body in blocks.items()))
        return 0
    text = read_text(args.readme, "--readme")
    if not args.check:
        check_writable(args.readme, "--readme")
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
