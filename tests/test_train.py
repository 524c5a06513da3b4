"""`python -m convbert_fast train`: the three objectives, metrics, exact resume, torchrun, transformers.Trainer,
bad input and atomic checkpoints. Tiny models (hidden 32, one layer, 32 tokens, a 600-token vocabulary trained once
per session on a slice of the built-in corpus) keep the file to about a minute on two CPU cores."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import convbert_fast as cf
from convbert_fast import cli, data, train

TINY = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "embedding_size": 32,
    "num_hidden_layers": 1,
    "max_position_embeddings": 64,
}
VOCAB = 600


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    """A config file, a text file of ~40 KB of the built-in corpus, and the tokenizer cache (trained here once)."""
    root = tmp_path_factory.mktemp("train")
    (root / "tiny.json").write_text(json.dumps(TINY))
    docs = data.builtin_corpus()[:300]
    (root / "corpus.txt").write_text("\n".join(docs) + "\n")
    tokenizer = data.train_tokenizer(docs, VOCAB, str(root / "cache"))
    return SimpleNamespace(root=root, config=str(root / "tiny.json"), corpus=str(root / "corpus.txt"),
                           cache=str(root / "cache"), docs=docs, tokenizer=tokenizer)  # fmt: skip


def base_args(ws, out, *extra):
    return [
        "train", "--config", ws.config, "--train-file", ws.corpus, "--vocab-size", str(VOCAB),
        "--cache-dir", ws.cache, "--seq-len", "32", "--batch-size", "8", "--lr", "5e-3", "--log-every", "1",
        "--device", "cpu", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def run_train(ws, out, *extra):
    assert cli.main(base_args(ws, out, *extra)) == 0
    return read_metrics(out)


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(entries):
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def evals(entries):
    return [e for e in entries if "eval_loss" in e]


@pytest.mark.timeout(300)  # a training run in a child process: 28 s on a loaded 2-core AMD EPYC
def test_mlm_writes_metrics_and_the_loss_falls(ws, tmp_path):
    entries = run_train(ws, tmp_path, "--max-steps", "30", "--eval-every", "10")
    steps = [e for e in entries if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 31))
    for e in steps:
        assert {"step", "loss", "lr", "tokens_per_s", "accuracy", "grad_norm"} <= set(e)
        assert e["tokens_per_s"] > 0 and math.isfinite(e["loss"])
    assert steps[0]["lr"] == 0.0 and max(e["lr"] for e in steps) == pytest.approx(5e-3)  # warmup, then decay
    assert [e["step"] for e in evals(entries)] == [10, 20, 30]
    for e in evals(entries):
        assert e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"])) and 0 <= e["eval_accuracy"] <= 1
    # The first steps predict about uniformly: loss ~ ln(600) = 6.4. Learning just the token frequencies takes it
    # below 6 within 30 steps at this learning rate (seen: 6.4 -> ~5.7); a 5-step mean of ~200 masked tokens
    # varies by ~0.1 by chance, so a 0.3 margin fails only if the model does not learn.
    first, last = [e["loss"] for e in steps[:5]], [e["loss"] for e in steps[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.3
    assert evals(entries)[-1]["eval_loss"] < evals(entries)[0]["eval_loss"]
    # the checkpoint loads as a model and a tokenizer
    checkpoint = tmp_path / "checkpoint-30"
    model = cf.ConvBertForMaskedLM.from_pretrained(checkpoint)
    assert (checkpoint / "model.safetensors").is_file() and model.config.vocab_size == VOCAB
    from transformers import AutoTokenizer

    assert (
        AutoTokenizer.from_pretrained(checkpoint)("a function")["input_ids"] == ws.tokenizer("a function")["input_ids"]
    )
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["samples_seen"] == 240


def test_electra_shares_embeddings_and_trains_both_losses(ws, tmp_path):
    config = cf.ConvBertConfig(**TINY, vocab_size=VOCAB)
    model = train.ElectraPretraining.from_config(config)
    gen, disc = model.generator, model.discriminator
    assert gen.config.hidden_size == 8 and gen.config.embedding_size == disc.config.embedding_size
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert getattr(gen.convbert.embeddings, name).weight is getattr(disc.embeddings, name).weight
    assert gen.generator_lm_head.weight.data_ptr() == disc.embeddings.word_embeddings.weight.data_ptr()

    entries = run_train(ws, tmp_path, "--objective", "electra", "--max-steps", "4", "--eval-every", "2")
    for e in [e for e in entries if "loss" in e]:
        assert math.isfinite(e["generator_loss"]) and math.isfinite(e["discriminator_loss"])
        assert e["loss"] == pytest.approx(e["generator_loss"] + 50 * e["discriminator_loss"])
    assert all(0 <= e["eval_discriminator_accuracy"] <= 1 for e in evals(entries))
    loaded = train.ElectraPretraining.from_pretrained(str(tmp_path / "checkpoint-4"))
    assert loaded.generator.convbert.embeddings is loaded.discriminator.embeddings
    trained = cf.ConvBertModel.from_pretrained(tmp_path / "checkpoint-4" / "discriminator")
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.discriminator.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.timeout(300)  # two ELECTRA training runs
def test_gradient_checkpointing_keeps_the_losses(ws, tmp_path):
    """--gradient-checkpointing (cf.enable_checkpointing on the generator and the discriminator, on every
    transformers 5.x) recomputes the same activations, dropout masks included: the same losses step by step."""
    args = ("--objective", "electra", "--max-steps", "3", "--seed", "5")
    plain = losses(run_train(ws, tmp_path / "plain", *args))
    checkpointed = losses(run_train(ws, tmp_path / "checkpointed", *args, "--gradient-checkpointing"))
    assert sorted(plain) == [1, 2, 3]
    assert checkpointed == pytest.approx(plain, rel=0, abs=1e-6)


@pytest.mark.timeout(300)  # a training run: 2 s alone, 27 s at a load average of 6 on 2 cores
def test_classification_fine_tuning_learns_a_keyword(ws, tmp_path):
    """label = whether the word "zebra" (in no document; 5 WordPiece tokens) was put at a random place into the
    first 10 words of a document. Every text fits in --seq-len 64, so the keyword is never cut off (20 words in 32
    tokens cut it from 35 of 120 positives, and the model stayed near chance). Each evaluation text comes once with
    and once without the keyword: a classifier blind to the insertion scores exactly 0.5, and a coin per example
    reaches 0.8 of 200 with probability < 2e-18. With seeds 0-7 (data and --seed) it ended at 0.925-0.955 on torch 2.13 and
    0.89-0.985 on torch 2.11; with shuffled training labels at 0.455-0.5."""
    generator = torch.Generator().manual_seed(0)

    def with_keyword(words):
        at = int(torch.randint(len(words) + 1, (1,), generator=generator))
        return " ".join([*words[:at], "zebra", *words[at:]])

    starts = [doc.split()[:10] for doc in ws.docs]
    rows = [(with_keyword(words), "yes") if i % 2 else (" ".join(words), "no") for i, words in enumerate(starts[:200])]
    eval_rows = [row for words in starts[200:] for row in ((" ".join(words), "no"), (with_keyword(words), "yes"))]
    assert max(len(ws.tokenizer(text)["input_ids"]) for text, _ in rows + eval_rows) <= 64
    (tmp_path / "train.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in eval_rows))
    entries = run_train(
        ws, tmp_path / "out", "--task", "cls", "--train-file", str(tmp_path / "train.tsv"), "--eval-file",
        str(tmp_path / "eval.jsonl"), "--seq-len", "64", "--max-steps", "100", "--batch-size", "16",
        "--eval-every", "50", "--save-every", "50",
    )  # fmt: skip
    first, last = [e["loss"] for e in entries if "loss" in e][:10], [e["loss"] for e in entries if "loss" in e][-10:]
    assert sum(last) < sum(first)
    assert evals(entries)[-1]["eval_accuracy"] > 0.8
    halfway, model = (
        cf.ConvBertForSequenceClassification.from_pretrained(tmp_path / "out" / f"checkpoint-{n}") for n in (50, 100)
    )
    assert model.config.id2label == {0: "no", 1: "yes"}
    # the head is trained too: with it frozen, the encoder alone learns the keyword (0.875-0.965)
    for name, weight in model.classifier.state_dict().items():
        assert not torch.equal(weight, halfway.classifier.state_dict()[name]), name


def test_packed_micro_batches_give_the_sums_and_gradients_of_the_padded_ones(ws):
    """`--packing`'s step: a padded micro-batch packed into one row (train.packed) gives the masked-LM and
    classification sums, and the gradients, of the same micro-batch padded, the model in its padding-invariant
    mode (dropout off: the comparison is of the math)."""
    rows = data.documents(ws.docs[:6], ws.tokenizer, 32)
    assert (rows["attention_mask"].sum(1) < 32).any()  # padded rows, of different lengths
    generator = torch.Generator().manual_seed(0)
    mlm_batch = train.MaskedLM(ws.tokenizer).prepare(rows, generator)
    cls_batch = {**rows, "labels": torch.randint(0, 2, (len(rows["input_ids"]),), generator=generator)}
    for model_class, objective, batch in (
        (cf.ConvBertForMaskedLM, train.MaskedLM, mlm_batch),
        (cf.ConvBertForSequenceClassification, train.Classification, cls_batch),
    ):
        torch.manual_seed(0)
        config = cf.ConvBertConfig(**TINY, vocab_size=VOCAB, num_labels=2, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, padding_invariant=True)  # fmt: skip
        model = model_class(config)
        args = (ws.tokenizer,) if objective is train.MaskedLM else ()
        packed_sums = objective(*args, packing=True).sums(model, batch)
        padded_sums = objective(*args).sums(model, batch)
        name = "mlm_loss" if objective is train.MaskedLM else "loss"
        params = list(model.parameters())
        packed_grads = torch.autograd.grad(packed_sums[name], params, allow_unused=True)
        padded_grads = torch.autograd.grad(padded_sums[name], params, allow_unused=True)
        torch.testing.assert_close(packed_sums[name], padded_sums[name], rtol=1e-5, atol=1e-5)
        for a, b in zip(packed_grads, padded_grads):
            if a is None or b is None:
                assert a is None and b is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)  # two short training runs
def test_packing_trains_masked_lm_and_a_classifier(ws, tmp_path):
    """`train --packing`: masked-LM rows are whole documents (none crosses a document, none is cut into another's
    row) and the fine-tuning examples are packed too; both train, and the checkpoint's config keeps the mode."""
    entries = run_train(ws, tmp_path / "mlm", "--packing", "--max-steps", "6", "--eval-every", "3")
    steps = [e for e in entries if "loss" in e]
    assert len(steps) == 6 and all(math.isfinite(e["loss"]) for e in steps)
    assert [e["step"] for e in evals(entries)] == [3, 6]
    model = cf.ConvBertForMaskedLM.from_pretrained(tmp_path / "mlm" / "checkpoint-6")
    assert model.config.padding_invariant is True
    (tmp_path / "train.tsv").write_text("".join(f"{doc[:80]}\t{i % 2}\n" for i, doc in enumerate(ws.docs[:40])))
    entries = run_train(ws, tmp_path / "cls", "--packing", "--task", "cls", "--train-file", str(tmp_path / "train.tsv"),
                        "--max-steps", "3")  # fmt: skip
    assert all(math.isfinite(e["loss"]) for e in entries if "loss" in e)


@pytest.mark.timeout(300)  # three training runs: 20 s loaded
def test_resume_continues_with_the_same_losses(ws, tmp_path):
    """Dropout on (the config's 0.1): masks, order and dropout depend on (seed, step) only, so 6 steps in one go
    and 3 steps + resume give bitwise the same losses on the CPU in fp32."""
    args = ("--max-steps", "6", "--save-every", "3", "--eval-every", "3")
    whole = run_train(ws, tmp_path / "whole", *args)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = run_train(ws, resumed_dir, *args, "--resume", "latest")
    assert [e["step"] for e in resumed if "loss" in e] == [4, 5, 6]
    assert losses(resumed) == {s: v for s, v in losses(whole).items() if s > 3}  # exact
    assert evals(resumed) == [e for e in evals(whole) if e["step"] == 6]
    # resumed in its own directory, metrics.jsonl drops what came after the checkpoint and is written again
    shutil.rmtree(tmp_path / "whole" / "checkpoint-6")
    (tmp_path / "whole" / "checkpoint-3.tmp").mkdir()  # a save cut short is not a checkpoint
    again = run_train(ws, tmp_path / "whole", *args, "--resume", "latest")
    timeless = [[{k: v for k, v in e.items() if k != "tokens_per_s"} for e in m] for m in (again, whole)]
    assert timeless[0] == timeless[1]
    # and a different seed gives different losses, so the equality above is not vacuous
    other = run_train(ws, tmp_path / "other", *args, "--seed", "1")
    assert losses(other)[4] != losses(whole)[4]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)  # torchrun with two gloo processes, then one: 36 s loaded
def test_torchrun_two_processes_match_one(ws, tmp_path):
    """--batch-size is the global batch: 2 processes x 4 rows (gloo) and 1 process x 8 rows (and 1 x 2 x 4
    accumulated) see the same rows and masks, so the losses agree up to the order of float sums (all-reduce of
    gradients: ~1e-7 relative per step, grown over 8 Adam steps; rtol 1e-4 leaves margin and still fails on any
    difference in data, masks or normalisation, which moves the loss by >1e-2). Dropout is off: each process
    draws its own dropout masks."""
    args = ("--max-steps", "8", "--dropout", "0", "--eval-every", "4")
    one = run_train(ws, tmp_path / "one", *args)
    accumulated = run_train(ws, tmp_path / "accum", *args, "--grad-accum", "2")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(cf.__file__).parent.parent),
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "convbert_fast", *base_args(ws, tmp_path / "two", *args)],
        capture_output=True, text=True, timeout=240, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    two = read_metrics(tmp_path / "two")
    assert "on 2 process(es)" in result.stdout and result.stdout.count("metrics:") == 1  # rank 0 reports
    assert sorted(losses(two)) == list(range(1, 9))
    norms = {e["step"]: e["grad_norm"] for e in one if "grad_norm" in e}
    for other in (two, accumulated):
        for step, loss in losses(one).items():
            assert losses(other)[step] == pytest.approx(loss, rel=1e-4)
        for e in [e for e in other if "grad_norm" in e]:  # Adam hides a gradient's scale from the losses; not this
            assert e["grad_norm"] == pytest.approx(norms[e["step"]], rel=1e-4)
        for a, b in zip(evals(one), evals(other), strict=True):
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert losses(one)[8] < losses(one)[1]


def test_transformers_trainer_trains_a_convbert_fast_model(ws, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = ws.tokenizer
    torch.manual_seed(0)
    model = cf.ConvBertForMaskedLM(cf.ConvBertConfig(**TINY, vocab_size=len(tokenizer), pad_token_id=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = data.pack(ws.docs, tokenizer, 32)["input_ids"][:64]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3, use_cpu=True,
        report_to=[], logging_steps=1, save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": r} for r in rows],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
    )
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer.save_model(str(tmp_path / "saved"))
    loaded = cf.ConvBertForMaskedLM.from_pretrained(tmp_path / "saved")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


@pytest.fixture
def small_checkpoint(ws, tmp_path):
    path = tmp_path / "ckpt"
    cf.ConvBertForMaskedLM(cf.ConvBertConfig(**TINY, vocab_size=VOCAB)).save_pretrained(path)
    ws.tokenizer.save_pretrained(path)
    return path


def _vocab(path, tokens):
    path.write_text("\n".join(tokens) + "\n")
    return str(path)


BAD_INPUT = {
    "missing file": (["--train-file", "{tmp}/nope.txt"], "training file {tmp}/nope.txt does not exist"),
    "empty file": (["--train-file", "{tmp}/empty.txt"], "is empty"),
    "gzip file": (["--train-file", "{tmp}/corpus.txt.gz"], "training file {tmp}/corpus.txt.gz is gzip-compressed"),
    "Latin-1 file": (["--train-file", "{tmp}/latin1.txt"], "is not UTF-8 text (byte 0xe9 at offset 3)"),
    "directory as the file": (["--train-file", "{tmp}"], "training file {tmp} is a directory, not a file"),
    # root reads any file whatever its mode: /proc/self/mem is a file whose read fails (EIO) for root too
    "unreadable file": (["--train-file", "/proc/self/mem"], "training file /proc/self/mem cannot be read: "),
    "cls: gzip file, checked before the tokenizer is trained": (
        ["--task", "cls", "--train-file", "{tmp}/corpus.txt.gz", "--cache-dir", "{tmp}/fresh-cache"],
        "is gzip-compressed",
    ),
    "directory as the eval file": (["--eval-file", "{tmp}"], "evaluation file {tmp} is a directory"),
    "Latin-1 vocab": (["--vocab", "{tmp}/latin1.txt"], "vocab file {tmp}/latin1.txt is not UTF-8 text"),
    "config not JSON": (["--config", "{tmp}/empty.txt"], "--config {tmp}/empty.txt is not JSON"),
    "output dir is a file": (
        ["--output-dir", "{tmp}/empty.txt/run"],
        "--output-dir {tmp}/empty.txt/run: {tmp}/empty.txt is a file, not a directory",
    ),
    "log every 0": (["--log-every", "0"], "--log-every must be at least 1"),
    "negative eval interval": (["--eval-every", "-1"], "--eval-every must be at least 0"),
    "dropout of 1": (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    "lr of 0": (["--lr", "0"], "--lr must be positive, got 0.0"),
    "no layers": (["--layers", "0"], "--layers must be at least 1"),
    "vocab without [MASK]": (["--vocab", "{tmp}/no_mask.txt"], "lacks the special token(s) [MASK]"),
    "vocab larger than the model": (
        ["--init-from", "{ckpt}", "--vocab", "{tmp}/big.txt"],
        f"the vocabulary has 2005 tokens but the model's vocab_size is {VOCAB}",
    ),
    "resume with no checkpoint": (["--resume", "latest"], "--resume latest: no checkpoint-N directory in"),
    "seq-len above the positions": (
        ["--seq-len", "100"],
        "--seq-len 100 exceeds the model's max_position_embeddings = 64",
    ),
    "cls with electra": (["--task", "cls", "--objective", "electra"], "--objective electra is a pretraining objective"),
    "cls without labels": (["--task", "cls", "--train-file", "{corpus}"], "expected text<TAB>label"),
    "fp16 on the CPU": (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
    "fsdp on the CPU": (["--fsdp"], "--fsdp needs CUDA GPUs"),
    "packing electra": (["--packing", "--objective", "electra"], "--packing packs masked-LM rows and fine-tuning"),
    "no GPU for the process": (["--device", "cuda"], "--device cuda: process 0 has no GPU"),
    "batch not divisible": (
        ["--batch-size", "7", "--grad-accum", "2"],
        "must be a multiple of processes x --grad-accum",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_status_2(case, ws, tmp_path, small_checkpoint, capsys):
    if case == "no GPU for the process" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(Path(ws.corpus).read_bytes()))
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait\tyes\n".encode("latin-1"))
    _vocab(tmp_path / "no_mask.txt", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the"])
    _vocab(tmp_path / "big.txt", data.SPECIAL_TOKENS + [f"w{i}" for i in range(2000)])
    extra, message = BAD_INPUT[case]
    fill = {"tmp": tmp_path, "ckpt": small_checkpoint, "corpus": ws.corpus}
    argv = base_args(ws, tmp_path / "out", "--max-steps", "2") + [a.format(**fill) for a in extra]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err, err
    assert err.count("\n") == 1 and err.startswith("python -m convbert_fast train: error: ")  # no traceback
    assert not (tmp_path / "out" / "checkpoint-2").exists()
    assert not (tmp_path / "fresh-cache").exists()  # no tokenizer was trained before the check


def test_a_failed_save_leaves_no_checkpoint(ws, tmp_path, monkeypatch):
    """torch.save fails while checkpoint-2 is written: checkpoint-1 stays whole, no checkpoint-2 (nor .tmp)."""
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="disk full"):
        cli.main(base_args(ws, tmp_path, "--max-steps", "3", "--save-every", "1"))
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "metrics.jsonl"]
    assert (tmp_path / "checkpoint-1" / "training_state.pt").is_file()
    assert (tmp_path / "checkpoint-1" / "model.safetensors").is_file()
