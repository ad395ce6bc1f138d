"""Packed rows' attention run text by text, in buckets of like length (the SDPA backend).

A packed row (``models/packing.py``) holds several texts back to back, and attention is
block-diagonal in it. The fused kernels skip the key blocks that cross texts; torch's SDPA cannot, so
on it a row of `width` positions costs width^2 per head whatever it holds: a row of sixteen 20-token
queries costs 320^2 where its texts need 16 x 20^2, and two 250-token passages 500^2 where they need
2 x 250^2.

A `TextBuckets` plan gathers the packed q, k and v into right-padded batches instead, one per bucket
of texts of like length (each bucket padded to its longest text), and runs the padded soft-mask
attention on each; the outputs go back to their packed positions (0 at positions no text holds, as the
row path leaves them). The padded attention of a text is exactly the attention its packed row gives it
(same soft mask from its own length, no other text in its keys), so only the cost changes:
sum over buckets of texts x longest^2, which the plan compares with the rows' own cost and keeps only
when it is lower.

Layout: `token` [n_b, L_b] long holds the flattened packed position of position p of each text of a
bucket (past a text's end, its last token again: those positions are padded keys and discarded
queries); `keep` [n_b, L_b] bool marks the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

SHRINK = 0.75
"""A bucket takes texts down to this share of its longest: a text costs at most 1 / 0.75^2 = 1.8x
its own attention."""
SHORT = 32
"""Texts this short share one bucket, however their lengths differ: a call costs more than their
attention."""
GAIN = 0.8
"""Buckets are used when they cost at most this share of the rows (they cost more calls)."""


@dataclass
class Bucket:
    token: torch.Tensor
    """[n_b, L_b] long: flattened packed position of each text's position p (clamped to its end)."""
    lengths: torch.Tensor
    """[n_b] int32: true lengths."""
    keep: torch.Tensor
    """[n_b, L_b] bool: p < length."""


@dataclass
class TextBuckets:
    buckets: List[Bucket]
    positions: torch.Tensor
    """[sum of lengths] long: flattened packed position of every real token, bucket by bucket, in the
    order `keep` selects them."""
    weights: Dict[Tuple, List[torch.Tensor]] = field(default_factory=dict)
    """Soft-mask row weights m [n_b, L_b] per bucket, by schedule state: computed by the first layer
    of a forward and handed to the others as the same tensors, so the attention's mask cache hits."""


def bucket_bounds(sorted_lengths: List[int]) -> List[tuple]:
    """[start, stop) runs of `sorted_lengths` (longest first) that share a bucket."""
    bounds, start = [], 0
    for index, length in enumerate(sorted_lengths):
        head = sorted_lengths[start]
        if index > start and length < SHRINK * head and head > SHORT:
            bounds.append((start, index))
            start = index
    if sorted_lengths:
        bounds.append((start, len(sorted_lengths)))
    return bounds


def plan_text_buckets(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor, rows: int,
                      width: int) -> Optional[TextBuckets]:
    """The bucket plan of packed rows (``PackedRows`` offsets), or None when the rows cost less."""
    starts = cu_seqlens_padded[:-1].long().cpu()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    order = torch.sort(lengths, descending=True, stable=True).indices
    sorted_lengths = lengths[order].tolist()
    bounds = bucket_bounds(sorted_lengths)
    cost = sum((stop - start) * sorted_lengths[start] ** 2 for start, stop in bounds)
    if not bounds or cost > GAIN * rows * width * width:
        return None
    device = cu_seqlens.device
    buckets, positions = [], []
    for start, stop in bounds:
        texts = order[start:stop]
        text_lengths = lengths[texts]
        offsets = torch.arange(sorted_lengths[start])
        keep = offsets[None, :] < text_lengths[:, None]  # [n_b, L_b]
        token = starts[texts, None] + torch.minimum(offsets[None, :], text_lengths[:, None] - 1)
        positions.append(token[keep])
        buckets.append(Bucket(token.to(device), text_lengths.to(device=device, dtype=torch.int32), keep.to(device)))
    return TextBuckets(buckets, torch.cat(positions).to(device))
