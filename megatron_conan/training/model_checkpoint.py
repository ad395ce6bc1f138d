"""Model weights through megatron-core ``dist_checkpointing``: saved under one TP/PP layout, loadable
under any other (each rank writes and reads only its shards; the layout-free metadata lets
megatron-core reshard on load).

The full training checkpoint (optimizer, scheduler, RNG, data position, ``latest`` marker) builds on
these two functions in :mod:`megatron_conan.training.checkpointing`.
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
from megatron.core import dist_checkpointing

from megatron_conan.models.sharding import unwrap


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    """``{"model": …}`` for one chunk, ``{"model0": …, "model1": …}`` for interleaved chunks."""
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks: List[torch.nn.Module], checkpoint_dir: str) -> None:
    """Collective: write this layout's shards of the model weights to `checkpoint_dir`."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), checkpoint_dir)


def load_model(chunks: List[torch.nn.Module], checkpoint_dir: str) -> None:
    """Collective: read the weights from `checkpoint_dir`, resharding to this layout."""
    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), checkpoint_dir)
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
