"""`python -m convbert_fast train`: masked-LM or ELECTRA pretraining, or sequence-classification fine-tuning.

One process, or one per GPU/CPU slot under `torchrun` (DDP; FSDP with `--fsdp` on GPUs). `--batch-size` is the
*global* batch: the sequences of one optimizer step, summed over processes and accumulation steps, so a run gives
the same losses whatever the number of processes. Every random choice is a function of `--seed` and the step
(data order, masks, generator samples) or of the seed, step and rank (dropout), never of the history, so a run
resumed from a checkpoint continues with the same losses as one that was never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import convbert_fast as cf

from . import data
from .configs import RELEASED_CONFIGS, named_config
from .data import UsageError, exit_status_of

DISCRIMINATOR_WEIGHT = 50.0  # ELECTRA's weight of the replaced-token-detection loss
MAX_EVAL_ROWS = 512
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed(*parts) -> int:
    """A 63-bit seed that depends on `parts` only (not on Python's per-process hash salt)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(seed: int, step: int, tag: str) -> torch.Generator:
    """A CPU generator that depends on (seed, step, tag) only."""
    return torch.Generator().manual_seed(_seed(seed, tag, step))


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=_generator(seed, epoch, "epoch"))


def batch_rows(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Rows of the global batch of `step`: positions step*B ... step*B+B-1 of an endless stream of epochs, each a
    seeded permutation of the n rows."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    return torch.stack([_epoch_order(n, seed, int(p) // n)[int(p) % n] for p in positions])


def mask_tokens(input_ids, tokenizer, generator, probability=0.15):
    """BERT's masking: `probability` of the non-special tokens chosen; of those 80% -> [MASK], 10% -> a random
    token, 10% kept. Returns (inputs, labels) with labels -100 where nothing is predicted."""
    shape = input_ids.shape
    special = torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    chosen = torch.bernoulli(torch.full(shape, probability), generator=generator).bool() & ~special
    to_mask = torch.bernoulli(torch.full(shape, 0.8), generator=generator).bool() & chosen
    to_random = torch.bernoulli(torch.full(shape, 0.5), generator=generator).bool() & chosen & ~to_mask
    random_ids = torch.randint(len(tokenizer), shape, generator=generator)
    inputs = torch.where(to_mask, tokenizer.mask_token_id, torch.where(to_random, random_ids, input_ids))
    return inputs, torch.where(chosen, input_ids, -100)


def _cross_entropy_sums(logits, labels):
    """(summed cross-entropy, number right) over the positions whose label is not -100."""
    keep = labels != -100
    logits, labels = logits[keep].float(), labels[keep]
    return F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(-1) == labels).sum()


def packed(batch):
    """A padded micro-batch [b, L] as one packed row [1, T] in DataCollatorWithFlattening's form: the real tokens in
    order, position ids restarting at 0 at each sequence; per-token labels packed alike, per-sequence ones kept."""
    keep = batch["attention_mask"].bool()
    positions = batch["attention_mask"].cumsum(1) - 1
    labels = batch["labels"]
    return {
        "input_ids": batch["input_ids"][keep][None],
        "position_ids": positions[keep][None],
        "labels": labels[keep][None] if labels.dim() == 2 else labels,
    }


def _predict(model, batch, packing=False):
    """The model's logits scored against batch["labels"] by _cross_entropy_sums; with `packing`, on the batch
    packed into one row (the model in its padding-invariant mode: no work on padding, no attention or conv across
    sequences)."""
    if packing:
        batch = packed(batch)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _cross_entropy_sums(logits, batch["labels"])


# --- objectives: how a batch is prepared, what a forward sums, and how sums become a loss and metrics -------------
# `sums` add over micro-batches and processes; `counts` (the denominators) are taken from the global batch, so
# loss = sum / global count gives the gradient of the global mean whatever the split.


class MaskedLM:
    name = "mlm"

    def __init__(self, tokenizer, packing=False):
        self.tokenizer, self.packing = tokenizer, packing

    def prepare(self, batch, generator):
        inputs, labels = mask_tokens(batch["input_ids"], self.tokenizer, generator)
        return {**batch, "input_ids": inputs, "labels": labels}

    def counts(self, batch):
        return {"masked": int((batch["labels"] != -100).sum())}

    def sums(self, model, batch):
        return dict(zip(("mlm_loss", "mlm_correct"), _predict(model, batch, self.packing)))

    def loss(self, sums, counts):
        return sums["mlm_loss"] / counts["masked"]

    def summary(self, sums, counts):
        loss = sums["mlm_loss"] / counts["masked"]
        return {"loss": loss, "accuracy": sums["mlm_correct"] / counts["masked"], "perplexity": math.exp(min(loss, 50))}


class ReplacedTokenDetection(MaskedLM):
    """ELECTRA: the generator's MLM loss plus DISCRIMINATOR_WEIGHT x the discriminator's per-token loss."""

    name = "electra"

    def prepare(self, batch, generator):
        batch = super().prepare(batch, generator)
        return {**batch, "uniform": torch.rand(batch["input_ids"].shape, generator=generator)}  # for sampling

    def counts(self, batch):
        return {**super().counts(batch), "tokens": int(batch["attention_mask"].sum())}

    def sums(self, model, batch):
        generator_logits, discriminator_logits, replaced = model(**batch)
        mlm_loss, mlm_correct = _cross_entropy_sums(generator_logits, batch["labels"])
        attended = batch["attention_mask"].bool()
        logits, replaced = discriminator_logits[attended].float(), replaced[attended]
        disc_loss = F.binary_cross_entropy_with_logits(logits, replaced.float(), reduction="sum")
        disc_correct = ((logits > 0) == replaced).sum()
        return {"mlm_loss": mlm_loss, "mlm_correct": mlm_correct, "disc_loss": disc_loss, "disc_correct": disc_correct}

    def loss(self, sums, counts):
        return super().loss(sums, counts) + DISCRIMINATOR_WEIGHT * sums["disc_loss"] / counts["tokens"]

    def summary(self, sums, counts):
        mlm = super().summary(sums, counts)
        disc_loss = sums["disc_loss"] / counts["tokens"]
        return {
            "loss": mlm["loss"] + DISCRIMINATOR_WEIGHT * disc_loss,
            "generator_loss": mlm["loss"],
            "discriminator_loss": disc_loss,
            "mlm_accuracy": mlm["accuracy"],
            "perplexity": mlm["perplexity"],
            "discriminator_accuracy": sums["disc_correct"] / counts["tokens"],
        }


class Classification:
    name = "cls"

    def __init__(self, packing=False):
        self.packing = packing

    def prepare(self, batch, generator):
        return batch

    def counts(self, batch):
        return {"examples": len(batch["labels"])}

    def sums(self, model, batch):
        return dict(zip(("loss", "correct"), _predict(model, batch, self.packing)))

    def loss(self, sums, counts):
        return sums["loss"] / counts["examples"]

    def summary(self, sums, counts):
        return {"loss": sums["loss"] / counts["examples"], "accuracy": sums["correct"] / counts["examples"]}


# --- the ELECTRA pair ---------------------------------------------------------------------------------------------


class DiscriminatorPredictions(nn.Module):
    """ELECTRA's discriminator head: dense, activation, dense -> one logit per token ("was it replaced?")."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.GELU() if config.hidden_act == "gelu" else nn.ReLU()
        self.dense_prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden_states):  # [B, L, C] -> [B, L]
        return self.dense_prediction(self.activation(self.dense(hidden_states))).squeeze(-1)


def generator_config(config):
    """The ELECTRA generator: a quarter of the discriminator's width, heads and FFN; the same embeddings."""
    heads = max(config.head_ratio, config.num_attention_heads // 4)
    hidden = max(config.hidden_size // 4 // heads * heads, heads)
    return config.__class__(
        **{
            **config.to_dict(),
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "intermediate_size": max(config.intermediate_size // 4, 1),
            "num_groups": 1,
        }
    )


class ElectraPretraining(nn.Module):
    """A small `ConvBertForMaskedLM` generator and a `ConvBertModel` discriminator with a per-token binary head,
    sharing word / position / token-type embeddings (and their LayerNorm)."""

    def __init__(self, discriminator, generator):
        super().__init__()
        if generator.config.embedding_size != discriminator.config.embedding_size:
            raise UsageError("the generator's embedding_size must equal the discriminator's to share embeddings")
        self.discriminator = discriminator
        self.discriminator_predictions = DiscriminatorPredictions(discriminator.config)
        self.generator = generator
        generator.convbert.embeddings = discriminator.embeddings
        generator.generator_lm_head.weight = discriminator.embeddings.word_embeddings.weight
        self.config = discriminator.config

    @classmethod
    def from_config(cls, config):
        return cls(cf.ConvBertModel(config), cf.ConvBertForMaskedLM(generator_config(config)))

    def forward(self, input_ids, attention_mask, labels, uniform):
        generator_logits = self.generator(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, L, V]
        with torch.no_grad():  # sample replacements from the generator's softmax: inverse CDF at `uniform`
            masked = labels != -100
            cdf = generator_logits[masked].float().softmax(-1).cumsum(-1)  # [M, V]
            sampled = torch.searchsorted(cdf, uniform[masked, None] * cdf[:, -1:]).squeeze(-1)
            sampled = sampled.clamp_max(generator_logits.shape[-1] - 1)
            original = torch.where(masked, labels, input_ids)
            corrupted = original.masked_scatter(masked, sampled)
            replaced = corrupted != original  # a sample equal to the original counts as original, as in ELECTRA
        hidden = self.discriminator(input_ids=corrupted, attention_mask=attention_mask).last_hidden_state
        return generator_logits, self.discriminator_predictions(hidden), replaced

    def save_pretrained(self, path, state_dict=None):
        """generator/ and discriminator/ (each loads with from_pretrained) and discriminator_predictions.safetensors."""
        from safetensors.torch import save_file

        state_dict = self.state_dict() if state_dict is None else state_dict
        for name in ("generator", "discriminator", "discriminator_predictions"):
            part = {k.split(".", 1)[1]: v for k, v in state_dict.items() if k.split(".", 1)[0] == name}
            if name == "discriminator_predictions":
                save_file({k: v.contiguous() for k, v in part.items()}, os.path.join(path, f"{name}.safetensors"))
            else:
                getattr(self, name).save_pretrained(os.path.join(path, name), state_dict=part)

    @classmethod
    def from_pretrained(cls, path, **overrides):
        from safetensors.torch import load_file

        model = cls(
            cf.ConvBertModel.from_pretrained(os.path.join(path, "discriminator"), **overrides),
            cf.ConvBertForMaskedLM.from_pretrained(os.path.join(path, "generator"), **overrides),
        )
        model.discriminator_predictions.load_state_dict(
            load_file(os.path.join(path, "discriminator_predictions.safetensors"))
        )
        return model


# --- setup ----------------------------------------------------------------------------------------------------------


def _distributed(device_type):
    """(rank, world size, device); initialises the process group when torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"--device cuda: process {local_rank} has no GPU ({torch.cuda.device_count()} seen)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _check_args(args, world, device):
    if args.task == "cls" and args.objective != "mlm":
        raise UsageError(f"--objective {args.objective} is a pretraining objective; --task cls fine-tunes a classifier")
    if args.task == "cls" and not args.train_file:
        raise UsageError("--task cls needs --train-file (text<TAB>label lines, or a .jsonl of text/label)")
    if args.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU (autocast + GradScaler); use bf16 or fp32 on the CPU")
    if args.fsdp and (device.type != "cuda" or world < 2):
        raise UsageError("--fsdp needs CUDA GPUs and torchrun with 2 or more processes; on the CPU, torchrun runs DDP")
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "vocab_size", "log_every", "layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("eval_every", "save_every", "warmup_steps", "weight_decay", "max_grad_norm"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:  # `not >=`: NaN fails too
            raise UsageError(f"--{name.replace('_', '-')} must be at least 0")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    # every file named is read through (and every directory to write checked) now, before any work
    for path, what in ((args.train_file, "training file"), (args.eval_file, "evaluation file"),
                       (args.vocab, "vocab file")):  # fmt: skip
        if path:
            data.read_text(path, what)
    if args.config not in RELEASED_CONFIGS and not (args.init_from or args.resume):  # else the checkpoint's config
        if not os.path.exists(args.config):
            raise UsageError(f"--config {args.config!r}: neither one of {', '.join(RELEASED_CONFIGS)} nor a file")
        if not isinstance(data.read_json(args.config, "--config"), dict):
            raise UsageError(f"--config {args.config} is not a config.json (a JSON object)")
    for flag, path in (("--output-dir", args.output_dir), ("--cache-dir", args.cache_dir)):
        if path:
            data.check_directory_creatable(path, flag)
    if args.batch_size % (world * args.grad_accum):
        raise UsageError(
            f"--batch-size {args.batch_size} (the global batch) must be a multiple of processes x --grad-accum "
            f"= {world} x {args.grad_accum}"
        )
    if args.packing and args.task == "pretrain" and args.objective != "mlm":
        raise UsageError("--packing packs masked-LM rows and fine-tuning examples: it takes --objective mlm or --task cls")
    if args.resume and args.init_from:
        raise UsageError("--resume continues a run and --init-from starts one: give one of them")


def find_checkpoint(resume: str, output_dir: str) -> Path:
    """`--resume latest` -> the highest checkpoint-N in the output directory; else the directory given."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise UsageError(f"--resume {resume}: not a checkpoint directory (no trainer_state.json)")
        return path
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    if not found:
        raise UsageError(f"--resume latest: no checkpoint-N directory in {output_dir}")
    return max(found, key=lambda p: int(p.name.split("-", 1)[1]))


def _build_tokenizer(args, texts, source: Path | None):
    from transformers import PreTrainedTokenizerFast

    if args.vocab:
        return data.load_vocab(args.vocab)
    if source is not None:
        if not (source / "tokenizer.json").is_file():
            raise UsageError(f"{source} holds no tokenizer (tokenizer.json): give --vocab")
        return PreTrainedTokenizerFast.from_pretrained(str(source))
    return data.train_tokenizer(texts, args.vocab_size, args.cache_dir)


def _datasets(args, tokenizer, label_ids):
    """(train, eval) dicts of tensors; eval may have no rows."""
    if args.task == "cls":
        texts, labels = data.read_labelled(args.train_file)
        if args.eval_file:
            train_pairs, eval_pairs = list(zip(texts, labels)), list(zip(*data.read_labelled(args.eval_file)))
        else:
            train_pairs, eval_pairs = data.split_eval(list(zip(texts, labels)))
        return [
            data.encode_labelled(*zip(*pairs), label_ids, tokenizer, args.seq_len)
            for pairs in (train_pairs, eval_pairs)
        ]
    docs = data.read_text_file(args.train_file) if args.train_file else data.builtin_corpus()
    train_docs, eval_docs = data.split_eval(docs)
    rows = data.documents if args.packing else data.pack  # one document per row, or a stream cut into full rows
    train, evaluation = rows(train_docs, tokenizer, args.seq_len), rows(eval_docs, tokenizer, args.seq_len)
    if len(train["input_ids"]) == 0:
        raise UsageError(f"the training text is shorter than one row of --seq-len {args.seq_len} tokens")
    return train, {k: v[:MAX_EVAL_ROWS] for k, v in evaluation.items()}


def _build_model(args, tokenizer, source: Path | None, label_ids, device):
    overrides = {}
    if args.dropout is not None:
        overrides = {"hidden_dropout_prob": args.dropout, "attention_probs_dropout_prob": args.dropout}
    if args.task == "cls":
        overrides.update(num_labels=len(label_ids), label2id=label_ids, id2label={i: k for k, i in label_ids.items()})
        model_class = cf.ConvBertForSequenceClassification
    else:
        model_class = ElectraPretraining if args.objective == "electra" else cf.ConvBertForMaskedLM
    if source is not None:
        if not (source / "config.json").is_file() and not (source / "discriminator").is_dir():
            raise UsageError(f"{source} holds no model (no config.json)")
        if model_class is not ElectraPretraining and (source / "discriminator").is_dir():
            source = source / "discriminator"  # fine-tuning an ELECTRA checkpoint starts from its discriminator
        model = model_class.from_pretrained(str(source), **overrides)
    else:
        if args.config in RELEASED_CONFIGS:
            layers = args.layers or (12 if device.type == "cuda" else 2)
            config = named_config(args.config, num_hidden_layers=layers, **overrides)
        elif os.path.isfile(args.config):
            config = cf.ConvBertConfig.from_json_file(args.config)
            for key, value in {**overrides, **({"num_hidden_layers": args.layers} if args.layers else {})}.items():
                setattr(config, key, value)
        else:
            raise UsageError(f"--config {args.config!r}: neither one of {', '.join(RELEASED_CONFIGS)} nor a file")
        config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
        model = model_class.from_config(config) if model_class is ElectraPretraining else model_class(config)
    config = model.config
    if args.packing:
        config.padding_invariant = True  # packed rows run as their separate sequences (convbert_fast.sequences)
    if len(tokenizer) > config.vocab_size:
        raise UsageError(
            f"the vocabulary has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
        )
    if args.seq_len > config.max_position_embeddings:
        raise UsageError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings = {config.max_position_embeddings}"
        )
    return model


def _parallelize(model, args, world, device):
    """Gradient checkpointing, then FSDP (each layer, then the whole) or DDP when several processes run."""
    model.train()
    if args.gradient_checkpointing:
        for m in [model.generator, model.discriminator] if isinstance(model, ElectraPretraining) else [model]:
            cf.enable_checkpointing(m, use_reentrant=False)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        from .modeling import ConvBertLayer

        for module in model.modules():
            if isinstance(module, ConvBertLayer):
                fully_shard(module)
        fully_shard(model)
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, fused: one kernel over every parameter, where torch's default on the CPU is a loop of a dozen
    ops per tensor. On this project's 2-core Xeon a step over the 40M parameters of a 2-layer base model takes 26 ms
    fused against 166 ms (the default) and 129 ms (foreach); the training step's other fixed part is the word
    embedding's dense gradient. Fused AdamW runs on the CPU and CUDA, on DTensors (FSDP) and under a GradScaler."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def _param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _all_reduce(values: dict, world: int, device) -> dict:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _micro_batches(batch, rank, world, accum):
    """The global batch split into `accum` micro-batches, each into `world` shards: this rank's shards."""
    size = len(batch["input_ids"]) // (world * accum)
    for m in range(accum):
        start = (m * world + rank) * size
        yield {k: v[start : start + size] for k, v in batch.items()}


def evaluate(model, objective, eval_set, micro_size, rank, world, device, autocast):
    model.eval()
    sums, counts = defaultdict(float), defaultdict(float)
    shard = {k: v[rank::world] for k, v in eval_set.items()}
    with torch.no_grad():
        for start in range(0, len(shard["input_ids"]), micro_size):
            batch = {k: v[start : start + micro_size].to(device) for k, v in shard.items()}
            with autocast():
                for k, v in objective.sums(model, batch).items():
                    sums[k] += float(v)
            for k, v in objective.counts(batch).items():
                counts[k] += v
    model.train()
    totals = _all_reduce(
        {**{f"s/{k}": v for k, v in sums.items()}, **{f"c/{k}": v for k, v in counts.items()}}, world, device
    )
    sums = {k[2:]: v for k, v in totals.items() if k.startswith("s/")}
    return objective.summary(sums, {k[2:]: max(v, 1) for k, v in totals.items() if k.startswith("c/")})


# --- checkpoints ----------------------------------------------------------------------------------------------------


def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(output_dir, step, model, tokenizer, optimizer, scheduler, scaler, state, rank, fsdp):
    """output_dir/checkpoint-{step}/: the model (save_pretrained, safetensors), tokenizer, optimizer, scheduler,
    GradScaler and RNG states and trainer_state.json. Written to checkpoint-{step}.tmp, then renamed: a failure
    leaves no checkpoint-{step}."""
    model_state = optimizer_state = None
    if fsdp:  # gather full state dicts (a collective: every rank takes part)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    final = Path(output_dir) / f"checkpoint-{step}"
    if rank == 0:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            _unwrap(model).save_pretrained(str(tmp), state_dict=model_state)
            tokenizer.save_pretrained(str(tmp))
            rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(
                {
                    "optimizer": optimizer_state or optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng,
                },
                tmp / "training_state.pt",
            )
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if dist.is_initialized():
        dist.barrier()
    return final


def _load_training_state(path, model, optimizer, scheduler, scaler, fsdp):
    saved = torch.load(path / "training_state.pt", weights_only=False)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    random.setstate(saved["rng"]["python"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])


def _metrics_file(output_dir, resumed_step):
    """metrics.jsonl, opened for appending; on resume, entries after the resumed step are dropped."""
    path = Path(output_dir) / "metrics.jsonl"
    if path.is_file():
        lines = path.read_text().splitlines() if resumed_step else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= resumed_step]
        path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


# --- the loop -------------------------------------------------------------------------------------------------------


def run(args) -> int:
    rank, world, device = _distributed(args.device)
    try:
        return _run(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args, rank, world, device):
    import transformers
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    main = rank == 0
    _check_args(args, world, device)
    transformers.utils.logging.disable_progress_bar()  # loading/saving bars; the training loop has its own
    try:
        cf.set_backend(args.backend)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--backend {args.backend}: {e}") from None
    checkpoint = find_checkpoint(args.resume, args.output_dir) if args.resume else None
    start_step = 0
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if (state["task"], state["objective"]) != (args.task, args.objective):
            raise UsageError(
                f"{checkpoint} is a {state['task']}/{state['objective']} run, not {args.task}/{args.objective}"
            )
        if state.get("packing", False) != args.packing:  # the rows differ: the data order would not continue
            raise UsageError(f"{checkpoint} was trained {'with' if state.get('packing') else 'without'} --packing")
        start_step = state["step"]
    source = checkpoint or (Path(args.init_from) if args.init_from else None)
    if source is not None and not source.is_dir():
        raise UsageError(f"--init-from {source}: no such directory")

    # the tokenizer (rank 0 first: it may train and cache it), the data, the model
    if world > 1 and not main:
        dist.barrier()
    corpus = None if args.task == "cls" or not args.train_file else data.read_text_file(args.train_file)
    tokenizer = _build_tokenizer(args, corpus or data.builtin_corpus(), source)
    if world > 1 and main:
        dist.barrier()
    label_ids = None
    if args.task == "cls":
        config_labels = json.loads((source / "config.json").read_text()).get("label2id") if checkpoint else None
        label_ids = config_labels or {k: i for i, k in enumerate(sorted(set(data.read_labelled(args.train_file)[1])))}
    train_set, eval_set = _datasets(args, tokenizer, label_ids)
    if args.task == "cls":
        objective = Classification(args.packing)
    elif args.objective == "mlm":
        objective = MaskedLM(tokenizer, args.packing)
    else:
        objective = ReplacedTokenDetection(tokenizer)
    if len(eval_set["input_ids"]) < world:  # too few rows to give every process one: no evaluation
        eval_set = {k: v[:0] for k, v in eval_set.items()}
    else:
        eval_set = objective.prepare(eval_set, _generator(args.seed, 0, "eval"))  # the same masks at every evaluation
    torch.manual_seed(args.seed)
    model = _parallelize(_build_model(args, tokenizer, source, label_ids, device).to(device), args, world, device)

    optimizer = adamw(_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-6)
    warmup = args.warmup_steps if args.warmup_steps is not None else args.max_steps // 10
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, args.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if checkpoint is not None:
        _load_training_state(checkpoint, model, optimizer, scheduler, scaler, args.fsdp)
    autocast = functools.partial(
        torch.autocast, device.type, dtype=PRECISIONS[args.precision], enabled=args.precision != "fp32"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    micro_size = args.batch_size // (world * args.grad_accum)
    n_train = len(train_set["input_ids"])

    out = Path(args.output_dir)
    metrics = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        metrics = _metrics_file(
            out, start_step if checkpoint is not None and checkpoint.parent.resolve() == out.resolve() else 0
        )
        shape = model.config if not hasattr(model, "module") else model.module.config
        print(
            f"{args.task}/{args.objective}: {n_train} training rows of {args.seq_len} tokens, "
            f"{len(eval_set['input_ids'])} eval rows, vocab {len(tokenizer)}, hidden {shape.hidden_size} x "
            f"{shape.num_hidden_layers} layers, {sum(p.numel() for p in params) / 1e6:.2f}M parameters, "
            f"global batch {args.batch_size} on {world} process(es) x {args.grad_accum} accumulation step(s), "
            f"{device}, {args.precision}, backend {cf.get_backend()}"
            + (f"; resuming from {checkpoint} at step {start_step}" if checkpoint is not None else ""),
            flush=True,
        )

    def log(entry):
        if main:
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

    history, eval_history = [], []
    began = time.perf_counter()
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, disable=not main)
    for step in bar:
        tick = time.perf_counter()
        rows = batch_rows(n_train, args.batch_size, step, args.seed)
        batch = objective.prepare({k: v[rows] for k, v in train_set.items()}, _generator(args.seed, step, "mask"))
        counts = {k: max(v, 1) for k, v in objective.counts(batch).items()}  # the global denominators
        torch.manual_seed(_seed(args.seed, "dropout", step, rank))
        step_sums = defaultdict(float)
        try:
            for m, micro in enumerate(_micro_batches(batch, rank, world, args.grad_accum)):
                micro = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
                last = m == args.grad_accum - 1
                sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with autocast():
                        sums = objective.sums(model, micro)
                    scaler.scale(objective.loss(sums, counts) * world).backward()  # DDP averages over processes
                for k, v in sums.items():
                    step_sums[k] += v.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf
            )
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            raise UsageError(
                f"out of GPU memory with {micro_size} sequences of {args.seq_len} tokens per process: reduce "
                "--batch-size (or raise --grad-accum, or add --gradient-checkpointing)"
            ) from None
        summary = objective.summary(_all_reduce(step_sums, world, device), counts)
        tokens = int(batch["attention_mask"].sum())
        tokens_per_s = tokens / (time.perf_counter() - tick)
        done = step + 1
        history.append((done, summary["loss"]))
        if not math.isfinite(summary["loss"]):
            raise UsageError(f"the loss is {summary['loss']} at step {done}: lower --lr or use --precision fp32")
        if done % args.log_every == 0 or done == args.max_steps or done == start_step + 1:
            log({"step": done, **summary, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s})
            bar.set_postfix(loss=f"{summary['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
        if len(eval_set["input_ids"]) and ((args.eval_every and done % args.eval_every == 0) or done == args.max_steps):
            result = evaluate(model, objective, eval_set, micro_size, rank, world, device, autocast)
            eval_history.append((done, result))
            log({"step": done, **{f"eval_{k}": v for k, v in result.items()}})
            if main:
                bar.write(f"step {done}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in result.items()))
        if (args.save_every and done % args.save_every == 0) or done == args.max_steps:
            state = {
                "step": done,
                "epoch": done * args.batch_size / n_train,
                "samples_seen": done * args.batch_size,
                "task": args.task,
                "packing": args.packing,
                "objective": args.objective,
                "seed": args.seed,
                "world_size": world,
            }
            path = save_checkpoint(out, done, model, tokenizer, optimizer, scheduler, scaler, state, rank, args.fsdp)
    bar.close()
    if main:
        wall = time.perf_counter() - began
        if history:
            (s0, l0), (s1, l1) = history[0], history[-1]
            n = min(10, len(history) // 2)
            means = ""
            if n:
                first, last = (sum(loss for _, loss in part) / n for part in (history[:n], history[-n:]))
                means = f" (means of the first and last {n} steps: {first:.4f} -> {last:.4f})"
            print(f"loss {l0:.4f} at step {s0} -> {l1:.4f} at step {s1}{means} in {wall:.0f} s")
        if eval_history:
            print(
                f"eval at step {eval_history[-1][0]}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in eval_history[-1][1].items())
            )
        print(f"metrics: {out / 'metrics.jsonl'}")
        print(f"checkpoint: {path if history else checkpoint}")
        metrics.close()
    return 0


def main_or_exit(args) -> int:
    """Run; a UsageError becomes one line on stderr and exit status 2."""
    return exit_status_of("train", run, args)
