"""Pool a decoder's hidden states [s, b, h] (megatron layout) into one embedding per sequence.

Sequences are right-padded: positions >= lengths[i] of sequence i are padding. Modes: ``mean``
(padding excluded), ``last`` (position lengths[i] - 1, the last real token) and ``first``
(position 0); with ``starts``, a prompt at the start is left out (``pool``). The result is L2-normalised unless asked not to be, and pooled in at least float32:
a bf16 sum over thousands of positions drifts, and the losses want the precision.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_conan.config.model import POOLING_MODES


def pool(hidden: torch.Tensor, lengths: torch.Tensor, mode: str = "mean",
         normalize: bool = True, starts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Embeddings [b, h] from `hidden` [s, b, h] and the true `lengths` [b] (1 <= length <= s).

    `starts` [b] (optional): positions before it are a prompt that pooling leaves out (it still
    conditions the text through attention): ``mean`` averages positions [start, length), ``first``
    takes position start, ``last`` is unchanged. A start is clamped to length - 1, so a text the
    prompt fills (or truncation cut away) still pools its last token."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [s, b, h], got shape {tuple(hidden.shape)}")
    seq_len, batch, _ = hidden.shape
    if lengths.shape != (batch,) or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be an integer [b] = [{batch}] tensor, got "
                         f"{lengths.dtype} {tuple(lengths.shape)}")
    lengths = lengths.to(hidden.device)
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > seq_len):
        raise ValueError(f"lengths must lie in [1, {seq_len}] (the sequence length), got "
                         f"min {int(lengths.min())}, max {int(lengths.max())}")
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    if starts is None:
        starts = torch.zeros_like(lengths)
    else:
        if starts.shape != (batch,) or starts.dtype.is_floating_point:
            raise ValueError(f"starts must be an integer [b] = [{batch}] tensor, got "
                             f"{starts.dtype} {tuple(starts.shape)}")
        starts = torch.minimum(starts.to(lengths.device).clamp(min=0), lengths - 1)
    if mode == "mean":
        positions = torch.arange(seq_len, device=hidden.device)  # [s]
        keep = ((positions[:, None] < lengths[None, :])
                & (positions[:, None] >= starts[None, :])).to(compute_dtype)  # [s, b]
        pooled = torch.einsum("sbh,sb->bh", hidden.to(compute_dtype), keep)
        pooled = pooled / (lengths - starts)[:, None].to(compute_dtype)  # [b, h]
    elif mode == "last":
        pooled = hidden[lengths - 1, torch.arange(batch, device=hidden.device)]  # [b, h]
    else:
        pooled = hidden[starts, torch.arange(batch, device=hidden.device)]  # [b, h]
    pooled = pooled.to(compute_dtype)
    return F.normalize(pooled, dim=-1) if normalize else pooled
