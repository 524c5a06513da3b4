"""Padding that changes nothing: the padding-invariant mode (``config.padding_invariant = True``).

transformers' ConvBERT masks padding only in the attention scores; its two convs read the padded positions, so a
sentence's outputs change with the padding of its batch. In this mode every sequence gives what it gives alone,
its convs seeing zeros beyond its own ends. A batch arrives in one of three forms, read from its inputs:

- rows with padding (a 2-D ``attention_mask`` with zeros; right, left or both sides; no holes): the real tokens
  are gathered into one packed row (``unpad``) when that saves work, else the rows run in place with the conv
  inputs zeroed at the padding (``masked``: also under tracing, and where attention probabilities, a head mask or
  cross-attention are asked for);
- packed rows (``DataCollatorWithFlattening``'s form: ``position_ids`` restarting at 0 at each sequence, no padding):
  run as they are (``packed``);
- full rows: nothing to do, every row is one sequence.

Packed and unpadded rows run every layer on the T real tokens: the convs take the sequence offsets
(``cu_seqlens``), the attention runs per sequence (`PackedSequences.attention`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops

CONFIG_FIELD = "padding_invariant"

# Unpad a padded batch when at most this share of its positions are real tokens. Measured on the CPU (Intel Xeon,
# one thread, ConvBERT-base with 2 layers): unpadded against in place, forward and training step, 0.97-1.05x at
# 95-98% real tokens (B=1 and 8, L=128 and 256), 0.92x at 94% (B=1), 0.64x at 50%.
UNPAD_BELOW_REAL_FRACTION = 0.95


# ConvBertModel.forward's `sequence_layout` when no head read it (None means full rows)
UNREAD = object()


def is_padding_invariant(config) -> bool:
    return bool(getattr(config, CONFIG_FIELD, False))


@dataclass(frozen=True)
class Layout:
    """Where the sequences of a [B, L] batch lie: per sequence, its first token's index among the B * L tokens
    (row-major) and its length; `packed` when rows hold several sequences. Read from host copies of the mask or
    position ids: one device sync per forward."""

    batch: int
    seq_len: int
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    packed: bool

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def padded(self) -> bool:
        return self.tokens < self.batch * self.seq_len

    @classmethod
    def of(cls, batch: int, seq_len: int, attention_mask, position_ids) -> Layout | None:
        """The layout of a batch, or None for full rows (each row one sequence). Raises a ValueError for a mask
        with holes, a 3-D mask, and packed position ids beside padding."""
        packed_starts = None
        if position_ids is not None and seq_len > 1:
            positions = position_ids.reshape(-1, seq_len).expand(batch, seq_len)
            restarts = (positions[:, 1:] == 0).cpu()
            if restarts.any():
                starts = torch.cat([torch.ones(batch, 1, dtype=torch.bool), restarts], dim=1).flatten()
                packed_starts = starts.nonzero().flatten().tolist()
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "padding_invariant needs a 2-D attention_mask [batch, seq_len] (its zeros mark padding), got "
                f"{list(attention_mask.shape)}"
            )
        keep = None if attention_mask is None else (attention_mask != 0).cpu()
        if packed_starts is not None:
            if keep is not None and not keep.all():
                raise ValueError(
                    "padding_invariant: packed rows (position_ids restarting at 0) cannot also hold padding "
                    "(attention_mask zeros): pack without padding, or pad without packing"
                )
            ends = packed_starts[1:] + [batch * seq_len]
            lengths = tuple(end - start for start, end in zip(packed_starts, ends))
            return cls(batch, seq_len, tuple(packed_starts), lengths, packed=True)
        if keep is None or keep.all():
            return None
        lengths = keep.sum(1)
        first = keep.int().argmax(1)
        last = seq_len - 1 - keep.flip(1).int().argmax(1)
        holes = (lengths > 0) & (last - first + 1 != lengths)
        if holes.any():
            row = int(holes.nonzero()[0])
            raise ValueError(
                f"padding_invariant: attention_mask row {row} has padding between real tokens "
                f"({keep[row].int().tolist()}); each row must hold one run of 1s (padding on the right, left or both)"
            )
        starts = (torch.arange(batch) * seq_len + first).tolist()
        return cls(batch, seq_len, tuple(starts), tuple(lengths.tolist()), packed=False)

    def positions(self, device) -> torch.Tensor:
        """[B, L] position ids inside each sequence (0 at the padding): what each token's position is alone."""
        positions = torch.zeros(self.batch * self.seq_len, dtype=torch.long)
        for start, length in zip(self.starts, self.lengths):
            positions[start : start + length] = torch.arange(length)
        return positions.view(self.batch, self.seq_len).to(device)

    def token_index(self, device) -> torch.Tensor:
        """[T]: the real tokens' indices among the B * L tokens, sequence after sequence."""
        return torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, self.lengths)]).to(device)

    def plan(self, *, fused: bool, needs_probabilities: bool, cross_attention: bool) -> str:
        """How to run: "packed" (packed rows), "unpad" or "masked" (padded rows; see the module's docstring)."""
        if self.packed:
            if cross_attention:
                raise ValueError(
                    "padding_invariant: packed rows (position_ids restarting at 0) take no cross-attention"
                )
            return "packed"
        if not fused or needs_probabilities or cross_attention:
            return "masked"
        return "unpad" if self.tokens <= UNPAD_BELOW_REAL_FRACTION * self.batch * self.seq_len else "masked"


class MaskedConvs:
    """Padded rows run in place: the two convs read their inputs with zeros at the padding (the attention half
    takes the attention mask as always)."""

    cu_seqlens = None

    def __init__(self, token_mask: torch.Tensor):  # [B, L, 1]
        self.token_mask = token_mask

    def conv_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.token_mask.to(x.dtype)


# Attention of packed sequences on the CPU: one SDPA call per sequence for up to LOOP_AT_MOST_SEQUENCES of them,
# else the sequences sorted by length and padded in groups, a new group starting where a sequence's length squared
# falls under GROUP_AREA_FRACTION of its group's longest (so at most half of a group's scores are padding). Measured
# on the CPU (Intel Xeon, 2 threads, 6 heads of 64, forward + backward with dropout 0.1): 8 sequences of 8..256
# tokens 26 ms in a loop, 48 ms padded to the longest in one call; 8 of 240..256 49 against 56 (the loop's calls
# need no mask); 32 of 8..128 53 in a loop, 62-80 in one call, 38-42 in groups; 64 of 8..64 85 in a loop, 47-55 in
# one call, 35-39 in groups. On a GPU: one call (per-call cost dominates there; not measured, no GPU was lent).
LOOP_AT_MOST_SEQUENCES = 16
GROUP_AREA_FRACTION = 0.5


class PackedSequences:
    """One packed row of N sequences ([1, T, ...]): the convs take the offsets; attention runs per sequence."""

    def __init__(self, lengths, device):
        self.cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        self.lengths = [n for n in lengths if n > 0]
        self.max_len = max(self.lengths, default=0)
        starts = [0, *itertools.accumulate(self.lengths)][:-1]
        count = len(self.lengths)
        if torch.device(device).type != "cpu":
            groups = [list(range(count))]
        elif count <= LOOP_AT_MOST_SEQUENCES:
            groups = [[i] for i in range(count)]
        else:
            groups = _length_groups(self.lengths)
        self.groups = [_AttentionGroup([self.lengths[i] for i in g], [starts[i] for i in g], device) for g in groups]
        # the groups' outputs concatenated hold the sequences in group order: back to the packed order, unless it
        # is that already
        sequence_order = [i for g in groups for i in g]
        self.inverse = None
        if sequence_order != list(range(count)):
            grouped_tokens = torch.cat([torch.arange(starts[i], starts[i] + self.lengths[i]) for i in sequence_order])
            self.inverse = grouped_tokens.argsort().to(device)  # [T]: the grouped row of each packed token

    def conv_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def attention(self, query, key, value, num_heads: int, dropout_p: float) -> torch.Tensor:
        """[1, T, A] queries, keys and values -> [1, T, A] attention context, each token attending to its own
        sequence: on a GPU in fp16/bf16 without dropout, torch's varlen (flash) attention where this torch has it;
        else SDPA per sequence, or per group of sequences padded to the group's longest (LOOP_AT_MOST_SEQUENCES;
        on the CPU several times faster than nested tensors or a block-diagonal mask, forward and backward: README)."""
        total, width = query.shape[1], query.shape[2]
        head_size = width // num_heads
        varlen = _varlen_attention()
        if varlen is not None and query.is_cuda and dropout_p == 0 and query.dtype in (torch.float16, torch.bfloat16):
            offsets = torch.tensor([0, *itertools.accumulate(self.lengths)], dtype=torch.int32, device=query.device)
            q, k, v = (t[0].reshape(total, num_heads, head_size) for t in (query, key, value))  # [T, H, D]
            return varlen(q, k, v, offsets, offsets, self.max_len, self.max_len).reshape(1, total, width)
        if total == 0:
            return torch.zeros_like(query)
        if all(g.slots is None for g in self.groups):  # a loop over the sequences, in order: split, not sliced
            # (split's backward is one cat; a slice's writes the gradient into zeros the size of the whole row)
            parts = zip(*(t[0].split(self.lengths) for t in (query, key, value)))
            pieces = [_attend_one(*qkv, num_heads, dropout_p) for qkv in parts]
            return torch.cat(pieces).view(1, total, width)
        stacked = torch.stack([query[0], key[0], value[0]], dim=1)  # [T, 3, A]
        pieces = [g.attention(query[0], key[0], value[0], stacked, num_heads, dropout_p) for g in self.groups]
        context = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # [T, A] in group order
        if self.inverse is not None:
            context = context.index_select(0, self.inverse)
        return context.view(1, total, width)

    def block_diagonal_mask(self, dtype) -> torch.Tensor:
        """Additive [1, 1, T, T]: 0 within a sequence, the dtype's lowest value across sequences (the attention
        probabilities' path, which materialises the scores)."""
        offsets = self.cu_seqlens.long()
        ids = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=offsets.device), offsets.diff())
        same = ids[:, None] == ids[None, :]
        return ((~same).to(dtype) * torch.finfo(dtype).min)[None, None]



def first_tokens(hidden_states, attention_mask, layout: Layout | None, config) -> torch.Tensor:
    """[B, L, C] -> [N, 1, C]: each sequence's first token, which a classification head reads. transformers'
    models read position 0 of every row; in the padding-invariant mode, the first real token of each row (left
    padding), or of each packed sequence."""
    if layout is not None and layout.packed:
        starts = torch.tensor(layout.starts, device=hidden_states.device)
        return hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, starts)[:, None]
    if is_padding_invariant(config) and attention_mask is not None and attention_mask.dim() == 2:
        first = attention_mask.ne(0).int().argmax(1)  # 0 for a row without tokens
        return hidden_states.gather(1, first[:, None, None].expand(-1, 1, hidden_states.shape[-1]))
    return hidden_states[:, :1]


def _varlen_attention():
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10: flash attention over packed sequences, CUDA), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths` grouped for padded attention: longest first, a new group where a length's square falls
    under GROUP_AREA_FRACTION of the group's longest's."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not groups or lengths[i] ** 2 < GROUP_AREA_FRACTION * lengths[groups[-1][0]] ** 2:
            groups.append([])
        groups[-1].append(i)
    return groups


class _AttentionGroup:
    """Sequences attended in one SDPA call: one sequence is a slice of the packed row (no mask, no copy); several
    are padded to their longest (sequence i's tokens in slots i * longest + [0, n_i)) with a key mask."""

    def __init__(self, lengths: list[int], starts: list[int], device):
        self.longest, self.count = max(lengths, default=0), len(lengths)
        self.start, self.tokens, self.slots, self.key_mask = (starts[0] if starts else 0), None, None, None
        if self.count > 1:
            if not all(b == a + n for a, n, b in zip(starts, lengths, starts[1:])):  # not neighbours in the row
                self.tokens = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(device)
            self.slots = torch.cat([torch.arange(n) + i * self.longest for i, n in enumerate(lengths)]).to(device)
            lengths_t = torch.tensor(lengths)[:, None]
            self.key_mask = (torch.arange(self.longest) < lengths_t)[:, None, None, :].to(device)  # [n, 1, 1, M]
        self.size = sum(lengths)

    def attention(self, query, key, value, stacked, num_heads: int, dropout_p: float) -> torch.Tensor:
        """[T, A] the packed row's queries, keys, values ([T, 3, A] stacked) -> [size, A] this group's context."""
        width = query.shape[-1]
        head_size = width // num_heads
        if self.slots is None:
            rows = slice(self.start, self.start + self.size)
            return _attend_one(query[rows], key[rows], value[rows], num_heads, dropout_p)
        if self.tokens is None:  # its sequences are neighbours in the row
            mine = stacked[self.start : self.start + self.size]  # [size, 3, A]
        else:
            mine = stacked.index_select(0, self.tokens)
        padded = stacked.new_zeros(self.count * self.longest, 3, width).index_copy(0, self.slots, mine)
        q, k, v = padded.view(self.count, self.longest, 3, num_heads, head_size).permute(2, 0, 3, 1, 4)  # [N, H, M, D]
        context = _attend(q, k, v, self.key_mask, dropout_p).transpose(1, 2)  # [N, M, H, D]
        return context.reshape(self.count * self.longest, width).index_select(0, self.slots)


def _attend_one(query, key, value, num_heads: int, dropout_p: float) -> torch.Tensor:
    """[n, A] one sequence's queries, keys and values -> [n, A] its context (no mask: every key is its own)."""
    size, width = query.shape
    q, k, v = (t.view(1, size, num_heads, width // num_heads).transpose(1, 2) for t in (query, key, value))
    return _attend(q, k, v, None, dropout_p).transpose(1, 2).reshape(size, width)


def _attend(q, k, v, key_mask, dropout_p: float) -> torch.Tensor:
    """[N, H, M, D] -> [N, H, M, D]: SDPA, or on the CPU with dropout the explicit form with ops.dropout, in the
    input's precision (SDPA with dropout takes its math path on the CPU, which upcasts bf16/fp16 to fp32 and draws
    torch's dropout mask: the explicit form is faster there, as the model's fused layer does for unpacked rows)."""
    if dropout_p > 0 and q.device.type == "cpu":
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [N, H, M, M]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
        return ops.dropout(scores.softmax(-1), dropout_p, True) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
