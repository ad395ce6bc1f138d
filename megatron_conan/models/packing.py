"""Packed (varlen) rows for the embedding forward: several texts share one row, no padding between.

A contrastive batch pads every text to the longest one; with 20-token queries beside 512-token
passages most of the linear layers' work is padding. Packing puts texts back to back into rows of
`max_tokens_per_row` tokens (first-fit over the texts sorted by length, longest first) and describes
them in megatron-core's thd convention, which its RoPE already reads::

    cu_seqlens         [n + 1]  cumulative true lengths of the texts, in packed order
    cu_seqlens_padded  [n + 1]  where each text starts in the flattened rows (a text's slot runs to
                                the next text's start, so a row's trailing padding belongs to its
                                last text; RoPE positions restart at every slot)

The model runs on one flattened sequence [1, rows * width] with these `PackedRows` parameters; the
soft-mask core attention cuts it back into rows and turns the offsets into per-position key windows
(`ops/soft_mask_attention/reference.py`): attention is block-diagonal and the soft mask applies
inside each text as it does padded, so a text's embedding does not depend on its neighbours.

The parameters say qkv_format "sbhd" (one sequence of rows * width tokens, batch 1), not "thd":
megatron-core then applies RoPE to the whole flattened sequence in one call, and the embedder hands
it each token's own position (`models/embedder.py`), where its thd path would rebuild the
frequencies text by text, in Python, for q and k of every layer (11.5 s of 65 s in four packed
GradCache steps of the main job's stage 3, on a loaded 2-core CPU). Only the soft-mask core attention
reads the offsets and the row width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class PackedRows(PackedSeqParams):
    """megatron-core's packed-sequence parameters plus the row width: the soft-mask attention works
    row by row, so its cost is rows * width^2, not (rows * width)^2. qkv_format is "sbhd" (see the
    module docstring); the core attention also takes "thd" tensors with these parameters."""

    row_width: Optional[int] = None
    """Positions per row; texts never cross a row boundary."""


def first_fit_rows(lengths: Sequence[int], max_tokens_per_row: int) -> List[List[int]]:
    """Indices of the texts in each row: first-fit decreasing (longest text first, into the first row
    with room). A text longer than the budget gets a row of its own."""
    if max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be >= 1, got {max_tokens_per_row}")
    rows: List[List[int]] = []
    room: List[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        length = int(lengths[index])
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([])
            room.append(max_tokens_per_row)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= length
    return rows


@dataclass
class PackedBatch:
    """Right-padded texts re-laid as packed rows."""

    input_ids: torch.Tensor
    """[1, rows * width] token ids of the flattened rows (0 where no text)."""
    position_ids: torch.Tensor
    """[1, rows * width] position of each token in its text (restarting per text)."""
    params: PackedRows
    order: torch.Tensor
    """[n] long: packed position -> index of the text in the input batch."""
    token_index: torch.Tensor
    """[max_len, n] long: flattened position of token p of (input-order) text i (past its length, its
    last token again: pooling never reads those)."""
    padding_tokens: int
    """Positions of the rows that hold no text."""


def pack_batch(input_ids: torch.Tensor, lengths: torch.Tensor, max_tokens_per_row: int,
               multiple_of: int = 1) -> PackedBatch:
    """Pack right-padded `input_ids` [n, L] with true `lengths` [n] into rows of `max_tokens_per_row`
    positions (widened to the longest text), then narrowed to the fullest row, and rounded up to a
    multiple of `multiple_of` (e.g. the TP size under sequence parallelism, which splits the
    flattened sequence)."""
    if input_ids.dim() != 2 or lengths.shape != input_ids.shape[:1]:
        raise ValueError(f"input_ids must be [n, L] and lengths [n]; got {tuple(input_ids.shape)} "
                         f"and {tuple(lengths.shape)}")
    device = input_ids.device
    lengths_list = [int(x) for x in lengths.tolist()]
    if lengths_list and min(lengths_list) < 1:
        raise ValueError("every packed text needs at least one token")
    width = max([max_tokens_per_row] + lengths_list)
    width = -(-width // multiple_of) * multiple_of
    rows = first_fit_rows(lengths_list, width)
    # rows as wide as the fullest one: a batch smaller than one row (a GradCache chunk of queries)
    # would otherwise carry the rest of the row as padding through every layer
    fullest = max((sum(lengths_list[i] for i in row) for row in rows), default=1)
    width = -(-fullest // multiple_of) * multiple_of
    order = [i for row in rows for i in row]
    starts, flat_ids, positions = [], torch.zeros(len(rows) * width, dtype=input_ids.dtype, device=device), \
        torch.zeros(len(rows) * width, dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        offset = r * width
        for i in row:
            starts.append(offset)
            flat_ids[offset:offset + lengths_list[i]] = input_ids[i, :lengths_list[i]]
            positions[offset:offset + lengths_list[i]] = torch.arange(lengths_list[i], device=device)
            offset += lengths_list[i]
    packed_lengths = torch.tensor([lengths_list[i] for i in order], dtype=torch.int32)
    cu = torch.zeros(len(order) + 1, dtype=torch.int32)
    cu[1:] = packed_lengths.cumsum(0)
    cu_padded = torch.tensor(starts + [len(rows) * width], dtype=torch.int32)
    slots = cu_padded[1:] - cu_padded[:-1]
    params = PackedRows(qkv_format="sbhd", cu_seqlens_q=cu.to(device), cu_seqlens_kv=cu.to(device),
                        cu_seqlens_q_padded=cu_padded.to(device), cu_seqlens_kv_padded=cu_padded.to(device),
                        # the RoPE table's length: the longest slot (never the whole flattened sequence,
                        # which megatron would read as one sequence's positions)
                        max_seqlen_q=int(slots.max()) if len(slots) else width,
                        max_seqlen_kv=int(slots.max()) if len(slots) else width, row_width=width)
    start_of = torch.empty(len(order), dtype=torch.long)
    start_of[torch.tensor(order, dtype=torch.long)] = cu_padded[:-1].long()
    max_len = max(lengths_list, default=1)
    token_index = start_of[None, :] + torch.arange(max_len)[:, None]  # [max_len, n]
    token_index = torch.minimum(token_index, (start_of + torch.tensor(lengths_list) - 1)[None, :])
    return PackedBatch(flat_ids[None, :], positions[None, :], params, torch.tensor(order, device=device),
                       token_index.to(device), len(rows) * width - sum(lengths_list))
