"""The DHNM state's files inside a checkpoint: one shard per data-parallel rank,
``<checkpoint>/dhnm/shard_<rank>_of_<dp_size>.npz`` (arrays and a JSON ``meta``; the format is in
data/README.md). ``data/dhnm.py``'s ``DHNMState.save`` / ``load`` write and read them."""

import glob
import json
import os
import re
from typing import Dict, Iterator, Mapping, Tuple

import numpy

from megatron_conan import atomic_write
from megatron_conan.errors import CheckpointMismatchError

SHARD_DIRECTORY = "dhnm"
_SHARD_NAME = re.compile(r"shard_(\d{5})_of_(\d{5})\.npz$")


def shard_path(directory: str, dp_rank: int, dp_size: int) -> str:
    return os.path.join(directory, SHARD_DIRECTORY, f"shard_{dp_rank:05d}_of_{dp_size:05d}.npz")


def write_shard(path: str, state: Mapping[str, object]) -> None:
    """`state` (a `DHNMState.state_dict()`: its ``meta`` and arrays) to `path`, atomically."""
    arrays = {key: value for key, value in state.items() if key != "meta"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write.file(path) as temporary, open(temporary, "wb") as stream:
        numpy.savez(stream, meta=numpy.array(json.dumps(state["meta"])), **arrays)


def _shards_of_one_size(folder: str) -> Tuple[int, Dict[int, str]]:
    shards = {}
    for path in sorted(glob.glob(os.path.join(folder, "shard_*_of_*.npz"))):
        match = _SHARD_NAME.search(os.path.basename(path))
        if match:
            shards[(int(match.group(1)), int(match.group(2)))] = path
    sizes = {size for _, size in shards}
    if len(sizes) != 1:
        raise CheckpointMismatchError(
            f"{folder}: expected the DHNM shards of one DP size, found "
            f"{sorted(os.path.basename(p) for p in shards.values()) or 'none'}")
    size = sizes.pop()
    missing = [rank for rank in range(size) if (rank, size) not in shards]
    if missing:
        raise CheckpointMismatchError(f"{folder}: DHNM shards of DP ranks {missing} of {size} "
                                      f"are missing")
    return size, {rank: shards[rank, size] for rank in range(size)}


def read_shards(directory: str) -> Iterator[Tuple[str, Dict[str, object], Dict[str, numpy.ndarray]]]:
    """(path, meta, arrays) of every shard in `directory/dhnm/`, in rank order; the shards must be
    those of one DP size, none missing."""
    _, shards = _shards_of_one_size(os.path.join(directory, SHARD_DIRECTORY))
    for path in shards.values():
        with numpy.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            yield path, meta, {key: data[key] for key in data.files if key != "meta"}
