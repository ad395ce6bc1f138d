"""Names on disk (see the package docstring for the tree) and how a path resolves to a checkpoint."""

from __future__ import annotations

import os
import re
from typing import Optional

from megatron_conan import atomic_write
from megatron_conan.errors import InputError

LATEST = "latest"
"""Text file in a checkpoints directory: the name of the newest *complete* checkpoint."""
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's marker: the step of the newest complete checkpoint as a bare number."""
PARTIAL, NEXT, OLD = ".partial", ".next", ".old"
"""Suffixes of a save in progress, of a re-save moving in, of a checkpoint being deleted."""
COMMON_FILE = "common.pt"
"""Rank 0's state in a checkpoint: step, consumed samples, scheduler, model config, extra state."""
SHARDS_DIR = "model_optim"
"""The dist_checkpointing directory of model and optimizer shards."""
RNG_DIR = "rng"
LAYOUT_FILE = "layout.json"
"""The world / TP / PP / DP sizes that wrote the checkpoint."""
ITER_RE = re.compile(r"^iter_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def rng_file(checkpoint_dir: str, rank: int) -> str:
    return os.path.join(checkpoint_dir, RNG_DIR, f"rank_{rank:05d}.pt")


def read_latest(save_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint, or None when `save_dir` has none."""
    marker = os.path.join(save_dir, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker, encoding="utf-8") as handle:
        name = handle.read().strip()
    path = os.path.join(save_dir, name)
    if ITER_RE.match(name):
        if os.path.isdir(path):
            return path
        if os.path.isdir(path + NEXT):  # a re-save stopped between moving the old copy out and the new in
            return path + NEXT
    raise InputError(f"{marker} names {name!r}, which is not a complete checkpoint in {save_dir}")


def write_latest(save_dir: str, step: int) -> None:
    """Point ``latest`` (then Megatron-LM's marker) at step `step`, each file replaced atomically."""
    atomic_write.text(os.path.join(save_dir, LATEST), checkpoint_name(step) + "\n")
    atomic_write.text(os.path.join(save_dir, MEGATRON_TRACKER), f"{step}\n")


def resolve_checkpoint(path: str) -> str:
    """The ``iter_N`` directory meant by `path`: itself, the newest of a checkpoints directory (its
    ``latest``), or the newest of a run directory (``checkpoints/latest``)."""
    if not os.path.exists(path):
        raise InputError(f"checkpoint {path} does not exist")
    if not os.path.isdir(path):
        raise InputError(f"checkpoint {path} is not a directory")
    if os.path.isfile(os.path.join(path, COMMON_FILE)):
        return path
    for save_dir in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(save_dir, LATEST)):
            return read_latest(save_dir)
    raise InputError(f"{path} is not a checkpoint: no '{LATEST}' marker (checkpoints directory), no "
                     f"{COMMON_FILE} (iter_N directory) and no checkpoints/{LATEST} (run directory)")
