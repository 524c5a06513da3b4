"""Text for `python -m convbert_fast train`: the built-in corpus, a WordPiece tokenizer, packed and labelled datasets.

Everything here is deterministic: the same inputs give the same documents, splits, vocabulary and tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EVAL_EVERY_NTH = 20  # every 20th document (or labelled example) is held out for evaluation: a 5% split


class UsageError(ValueError):
    """Bad user input (a file, a vocabulary): the CLI prints the message and exits with status 2."""


def exit_status_of(command: str, run, *args) -> int:
    """run(*args)'s exit status; a UsageError becomes one line on stderr and exit status 2."""
    try:
        return run(*args)
    except UsageError as e:
        print(f"python -m convbert_fast {command}: error: {e}", file=sys.stderr)
        return 2


def builtin_corpus() -> list[str]:
    """Paragraphs of English prose: the topic help texts of Python's own documentation, `pydoc_data.topics`
    (shipped with every CPython, about 465 KB, under the PSF license)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            text = " ".join(block.split())
            if len(text) >= 40 and sum(c.isalpha() for c in text) > len(text) / 2:  # prose, not code or tables
                paragraphs.append(text)
    return paragraphs


def read_text_file(path: str) -> list[str]:
    """Plain text, one document per non-blank line."""
    docs = [" ".join(line.split()) for line in read_text(path).splitlines()]
    docs = [d for d in docs if d]
    if not docs:
        raise UsageError(f"training file {path} is empty (expected one document per line)")
    return docs


def read_text(path: str, what: str = "training file") -> str:
    """The UTF-8 text of a file the user named, or a UsageError that says what is wrong with it: missing, a
    directory, unreadable (the OS's reason: permissions, an I/O error), compressed, or not UTF-8."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory, not a file")
    if not os.path.exists(path):
        raise UsageError(f"{what} {path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        raise UsageError(f"{what} {path} is gzip-compressed: give the decompressed text (gunzip it)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): convert it, e.g. "
            f"`iconv -f latin1 -t utf-8`"
        ) from None


def read_json(path: str, what: str):
    """A JSON file the user named, parsed, or a UsageError (read_text's, or where the JSON is malformed)."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path} is not JSON: {e}") from None


def check_writable(path: str, what: str) -> None:
    """A UsageError unless a file can be written at `path` (checked before any work, so that a run does not end
    in a traceback after it measured or trained): not a directory, and its nearest existing directory writable."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{what} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{what} {path}: no permission to write there")


def check_directory_creatable(path: str, what: str) -> None:
    """A UsageError unless `path` is a directory, or one can be made there (the nearest existing ancestor is a
    writable directory, not a file)."""
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UsageError(f"{what} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise UsageError(f"{what} {path}: no permission to write in {ancestor}")


def split_eval(items: list) -> tuple[list, list]:
    """(train, eval): every EVAL_EVERY_NTH item goes to eval; the rest, in order, to train."""
    if len(items) < 2:
        raise UsageError(f"need at least 2 documents/examples to hold one out for evaluation, got {len(items)}")
    eval_items = items[::EVAL_EVERY_NTH]
    train_items = [x for i, x in enumerate(items) if i % EVAL_EVERY_NTH]
    return train_items, eval_items


# --- tokenizer -------------------------------------------------------------------------------------------------


def _bert_pipeline(tokenizer):
    """BERT's lowercasing normalizer, pre-tokenizer and WordPiece decoder on a `tokenizers.Tokenizer`."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _wrap(tokenizer):
    """A trained `tokenizers.Tokenizer` -> `transformers.PreTrainedTokenizerFast` adding [CLS] ... [SEP]."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def train_tokenizer(texts: list[str], vocab_size: int, cache_dir: str | None = None):
    """A lowercasing WordPiece tokenizer trained on `texts`, cached under `cache_dir` (default
    ~/.cache/convbert_fast/tokenizers) by a hash of the texts and the vocabulary size."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    cache_root = Path(cache_dir or Path.home() / ".cache" / "convbert_fast" / "tokenizers")
    path = cache_root / f"wordpiece-{digest}-{vocab_size}"
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = _wrap(tokenizer)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    wrapped.save_pretrained(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process (a torchrun rank) saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return wrapped


def load_vocab(path: str):
    """A BERT-style vocab.txt (one token per line) -> tokenizer; the five special tokens must be in it."""
    from tokenizers import Tokenizer, models

    vocab = {}
    for token in read_text(path, "vocab file").splitlines():
        if token and token not in vocab:
            vocab[token] = len(vocab)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise UsageError(f"vocab file {path} lacks the special token(s) {' '.join(missing)}")
    return _wrap(_bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))))


# --- datasets: dicts of tensors with the same first dimension --------------------------------------------------


def pack(docs: list[str], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """Documents joined by [SEP] into one token stream, cut into `[CLS] ... [SEP]` rows of `seq_len` (no padding;
    the tail that does not fill a row is dropped, so a short text gives no rows)."""
    if seq_len < 3:
        raise UsageError(f"--seq-len must be at least 3, got {seq_len}")
    stream = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tokenizer.sep_token_id])
    body = seq_len - 2
    rows = len(stream) // body
    ids = torch.tensor(stream[: rows * body]).view(rows, body)
    ids = torch.cat(
        [torch.full((rows, 1), tokenizer.cls_token_id), ids, torch.full((rows, 1), tokenizer.sep_token_id)], 1
    )
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def documents(docs: list[str], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """For packed training (`train --packing`): each document its own `[CLS] ... [SEP]` rows of at most `seq_len`
    tokens (a long one cut into several), padded to `seq_len` with an attention mask. No row crosses a document's
    boundary; the padding is dropped again when a micro-batch is packed into one row (train.packed)."""
    if seq_len < 3:
        raise UsageError(f"--seq-len must be at least 3, got {seq_len}")
    body = seq_len - 2
    rows = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        rows += [[tokenizer.cls_token_id, *ids[i : i + body], tokenizer.sep_token_id] for i in range(0, len(ids), body)]
    input_ids = torch.full((len(rows), seq_len), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], attention_mask[i, : len(row)] = torch.tensor(row), 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def read_labelled(path: str) -> tuple[list[str], list[str]]:
    """Labelled examples: JSON lines `{"text": ..., "label": ...}` (a .jsonl file), else `text<TAB>label` lines."""
    texts, labels = [], []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                record = json.loads(line)
                text, label = record["text"], record["label"]
            except (ValueError, KeyError, TypeError):
                raise UsageError(f'{path}:{n}: expected a JSON object with "text" and "label"') from None
        else:
            text, tab, label = line.rpartition("\t")
            if not tab:
                raise UsageError(f"{path}:{n}: expected text<TAB>label")
        texts.append(str(text))
        labels.append(str(label))
    if not texts:
        raise UsageError(f"training file {path} is empty (expected labelled examples)")
    if len(set(labels)) < 2:
        raise UsageError(f"{path} has a single label ({labels[0]!r}); classification needs at least two")
    return texts, labels


def encode_labelled(texts, labels, label_ids: dict[str, int], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    unknown = sorted(set(labels) - set(label_ids))
    if unknown:
        raise UsageError(f"label(s) {unknown} not among the training labels {sorted(label_ids)}")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([label_ids[label] for label in labels]),
    }
