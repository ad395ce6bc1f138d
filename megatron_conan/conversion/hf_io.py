"""Safetensors weights of a Hugging Face directory (one file or sharded with an index): the only form
in which outside weights come in (no pickle is ever read from a Hugging Face directory)."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import torch

from megatron_conan.errors import InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024 ** 3
"""Shard size of written weights (what transformers' save_pretrained uses by default)."""


def write_safetensors(state: Dict[str, torch.Tensor], directory: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """`state` as model.safetensors, or as shards plus model.safetensors.index.json when larger."""
    from safetensors.torch import save_file

    shards: List[Dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for key in sorted(state):
        tensor = state[key].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = tensor
        sizes[-1] += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, handle, indent=2)


def _weight_files(directory: str) -> List[str]:
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map") or {}
        return sorted({os.path.join(directory, name) for name in weight_map.values()})
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise InputError(f"{directory} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")


def read_safetensors_shapes(directory: str) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape, from the file headers only (nothing is loaded)."""
    from safetensors import safe_open

    shapes = {}
    for path in _weight_files(directory):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def read_safetensors(directory: str, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Every tensor of the directory's weights, as `dtype` CPU tensors."""
    from safetensors import safe_open

    state = {}
    for path in _weight_files(directory):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key).to(dtype)
    return state
