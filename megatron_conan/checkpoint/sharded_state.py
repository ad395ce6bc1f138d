"""Model (and optimizer) state as megatron-core ``dist_checkpointing`` sees it: saved under one
TP/PP layout, loadable under any other (each rank writes and reads only its shards; the layout-free
metadata lets megatron-core reshard on load).

:func:`save_model` / :func:`load_model` are the weights alone; the full training checkpoint
(optimizer, scheduler, RNG, data position, ``latest`` marker) builds on :func:`sharded_state` in
:mod:`megatron_conan.checkpoint.save` and :mod:`megatron_conan.checkpoint.load`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import torch
from megatron.core import dist_checkpointing

from megatron_conan.models.sharding import unwrap


def _chunk_keys(chunks: List[torch.nn.Module]) -> List[str]:
    """``["model"]`` for one chunk, ``["model0", "model1", …]`` for interleaved chunks."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    """The chunks' sharded state dicts under their checkpoint keys (see `_chunk_keys`)."""
    return {key: unwrap(chunk).sharded_state_dict() for key, chunk in zip(_chunk_keys(chunks), chunks)}


def sharded_state(chunks: List[torch.nn.Module], optimizer, is_loading: bool) -> Dict[str, Any]:
    """The model's sharded state dict, plus ``"optimizer"`` when `optimizer` is given."""
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        # fully_reshardable: the distributed optimizer's state in a layout-free form, so a
        # checkpoint loads under any TP/PP/DP (its default format is refused by dist_checkpointing).
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True},
        )
    return state


def load_model_state(chunks: List[torch.nn.Module], loaded: Dict[str, dict]) -> None:
    """Copy the model entries of a loaded dist checkpoint into the chunks (strict)."""
    for key, chunk in zip(_chunk_keys(chunks), chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)


def save_model(chunks: List[torch.nn.Module], checkpoint_dir: str) -> None:
    """Collective: write this layout's shards of the model weights to `checkpoint_dir`."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), checkpoint_dir)


def load_model(chunks: List[torch.nn.Module], checkpoint_dir: str) -> None:
    """Collective: read the weights from `checkpoint_dir`, resharding to this layout."""
    from megatron_conan.checkpoint.safe_load import load_dist_checkpoint

    load_model_state(chunks, load_dist_checkpoint(model_sharded_state_dict(chunks), checkpoint_dir))
