"""The benchmark's reports: the table printed at the end of a run, the plot, and the README's performance tables
written from committed records (`bench --markdown RECORD... --readme README.md`; a test checks that the README
holds exactly what this writes)."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from .providers import BASELINE, COMPILE_BASELINE, PADDING_ROWS, Measurement


def _ratio(a, b):
    return None if a is None or b is None else a / b

def provider_label(m) -> str:
    """The provider as tables show it: a compiled provider that left any frame to eager says so."""
    m = m if isinstance(m, dict) else asdict(m)
    return m["provider"] + (" (NOT compiled: fell back to eager)" if m.get("compiled") is False else "")


def padding_of(m) -> str:
    """A measurement's padding (PADDINGS); records from before heavy padding have only `padded`."""
    return m.get("padding") or ("half" if m["padded"] else "none")


def _by_batch(measurements):
    by_batch: dict[tuple, dict] = {}
    for m in measurements:
        by_batch.setdefault((m["seq_len"], padding_of(m)), {})[m["provider"]] = m
    return by_batch


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(measurements: list[Measurement]) -> str:
    rows = [
        f"{'L':>5} {'pad':>5} {'provider':<21} {'fwd ms':>9} {'train ms':>9} {'train tok/s':>12} {'fwd x eager':>11} "
        f"{'train x eager':>13} {'fwd x compile':>13} {'train x compile':>15} {'peak MB':>8} {'act MB':>7} "
        f"{'GEMM rate':>9}"
    ]
    for (seq_len, padding), at in _by_batch([asdict(m) for m in measurements]).items():
        base, compiled = at.get(BASELINE), at.get(COMPILE_BASELINE)
        for m in at.values():
            lead = f"{seq_len:>5} {padding:>5} {provider_label(m):<21}"
            if m["skipped"]:
                rows.append(f"{lead} skipped: {m['skipped']}")
                continue
            rows.append(  # inference-only providers (deploy) have no training step: "-"
                f"{lead} {m['forward_ms']:>9.1f} {_fmt(m['train_step_ms'], '>9.1f')} "
                f"{_fmt(m['train_tokens_per_s'], '>12.0f')} "
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

    done = [m for m in measurements if not m.skipped and m.train_step_ms is not None]
    base = {(m.seq_len, m.padding): m.train_step_ms for m in done if m.provider == BASELINE}
    styles = {"none": "-", "half": "--", "heavy": ":"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider in dict.fromkeys(m.provider for m in measurements):
        for padding, style in styles.items():
            points = sorted(
                (m.seq_len, base[m.seq_len, padding] / m.train_step_ms)
                for m in done
                if m.provider == provider and m.padding == padding and (m.seq_len, padding) in base
            )
            if points:
                label = provider + ("" if padding == "none" else f", rows {PADDING_ROWS[padding]}")
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


def model_markdown(record, path) -> str:
    s = record["settings"]
    lines = [
        f"ConvBERT-{s['config']} encoder with {s['layers']} layer{'s' if s['layers'] != 1 else ''}, "
        f"B={s['batch_size']}, {s['dtype']}: medians of "
        f"{s['repeats']} rounds in which the providers take turns; padded rows draw each row's length uniformly "
        "from [L/2, L] (or [8, L]) and pass the attention mask to both models; tokens/s counts real tokens; peak memory is "
        f"one training step of the provider alone ({record['memory_tool']}), activations are the peak less "
        "weights, gradients and AdamW state. " + _source(record, path) + _incomplete(record),
        "",
        "| L | rows | provider | forward | training step | train tokens/s | forward vs transformers "
        "| step vs transformers | step vs transformers-compile | peak memory | activations |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (seq_len, padding), at in _by_batch(record["measurements"]).items():
        base, compiled = at.get(BASELINE), at.get(COMPILE_BASELINE)
        rows = PADDING_ROWS[padding] + ("" if padding == "none" else ", masked")
        for m in at.values():
            label = provider_label({**m, "provider": OURS.get(m["provider"], m["provider"])})
            if m["skipped"]:
                lines.append(f"| {seq_len} | {rows} | {label} | skipped: {m['skipped']} |||||||")
                continue
            cells = [
                f"{m['forward_ms']:.1f} ms",
                _fmt(m["train_step_ms"], ".1f", " ms"),
                _fmt(m["train_tokens_per_s"], ".0f"),
                _fmt(_ratio(base and base["forward_ms"], m["forward_ms"]), ".2f", "x"),
                _fmt(_ratio(base and base["train_step_ms"], m["train_step_ms"]), ".2f", "x"),
                _fmt(_ratio(compiled and compiled["train_step_ms"], m["train_step_ms"]), ".2f", "x"),
                _fmt(m["peak_memory_mb"], ".1f", " MB"),
                _fmt(m["activation_memory_mb"], ".1f", " MB"),
            ]
            lines.append(f"| {seq_len} | {rows} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DEPLOY_ROWS = ("transformers", "onnxruntime-transformers", "cpp", "compile", "aoti", "onnxruntime-ours")
ORT_BASELINE = "onnxruntime-transformers"


def _forward_ms(m):
    return None if m is None or m["skipped"] else m["forward_ms"]


def deploy_markdown(record, path) -> str:
    """Inference of each deployed form of ours against transformers' eager model and ONNX Runtime on transformers'
    graph, from the deploy rows of a bench record (a sentence where it has none)."""
    s = record["settings"]
    measured = [m for m in record["measurements"] if m["provider"] in DEPLOY_ROWS]
    if not any(m["provider"] in ("aoti", "onnxruntime-ours") for m in measured):
        return (f"No deploy provider ran for `{path}`: `python -m convbert_fast bench --providers "
                f"{','.join(DEPLOY_ROWS)}` measures them. {_source(record, path)}\n")  # fmt: skip
    lines = [
        f"ConvBERT-{s['config']} encoder with {s['layers']} layer{'s' if s['layers'] != 1 else ''}, "
        f"B={s['batch_size']}, {s['dtype']}, inference (a forward, no gradients; artifacts checked against their "
        f"model on every batch): medians of {s['repeats']} rounds in which the providers take turns; padded rows "
        "pass the attention mask. " + _source(record, path) + _incomplete(record),
        "",
        "| L | rows | provider | forward | tokens/s | vs transformers | vs ONNX Runtime on transformers' graph |",
        "|---|---|---|---|---|---|---|",
    ]
    for (seq_len, padding), at in _by_batch(measured).items():
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
    """README block name -> its markdown, from bench records (blocks `model`, `ops`, `deploy`) and breakdown records
    (`breakdown`), in the order given."""
    parts: dict[str, list[str]] = {}
    for path in paths:
        record = json.loads(Path(path).read_text())
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
