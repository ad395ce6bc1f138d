"""Collective save of a resumable training checkpoint, and the rename protocol that keeps ``latest``
naming a complete checkpoint at every moment (see the package docstring for the tree).

A save writes everything into ``iter_N.partial``; after a barrier rank 0 renames it to ``iter_N``
and only then rewrites ``latest`` and ``latest_checkpointed_iteration.txt`` (each atomically). A
kill at any point leaves ``latest`` naming a complete checkpoint. After ``latest`` moves,
checkpoints beyond ``keep_last`` are renamed to ``.old`` and deleted, oldest first.

Re-saving a step whose ``iter_N`` exists (a signal right after a periodic save, or a resumed run
reaching a step a killed run had already written) never deletes the old copy before the new one is
complete: the finished ``.partial`` becomes ``iter_N.next``, the old ``iter_N`` becomes
``iter_N.old``, then ``iter_N.next`` becomes ``iter_N``. A kill between the last two renames leaves
``latest`` naming the missing ``iter_N``; :func:`~megatron_conan.checkpoint.layout.read_latest`
then returns the complete ``iter_N.next``, and the next save finishes the move.

The renames go through :func:`megatron_conan.atomic_write.rename` (durable: the parent directory is
fsynced). The shards are written by every rank through ``dist_checkpointing``; once every rank has
written its files, every rank fsyncs every file and directory of the ``.partial`` tree, and rank 0
does the renames once every rank is past that. Recovery and pruning act only on names a save makes,
and pruning only on checkpoints whose ``layout.json`` records this run's id (:func:`current_run_id`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_conan import atomic_write
from megatron_conan.checkpoint.layout import (
    COMMON_FILE,
    ITER_RE,
    LAYOUT_FILE,
    NEXT,
    OLD,
    PARTIAL,
    RNG_DIR,
    SHARDS_DIR,
    checkpoint_name,
    read_latest,
    rng_file,
    write_latest,
)
from megatron_conan.checkpoint.metadata import checkpoint_owner, common_state, write_layout
from megatron_conan.checkpoint.rng import rng_state
from megatron_conan.checkpoint.sharded_state import sharded_state
from megatron_conan.config.model import ConanModelConfig
from megatron_conan.distributed.device import current_placement
from megatron_conan.errors import InputError

logger = logging.getLogger(__name__)

LEFTOVER_RE = re.compile(r"^iter_\d{7,}(\.partial|\.next|\.old)$")
"""The only names :func:`recover` acts on: what an interrupted save leaves."""

SAVE_POINTS = ("before_shards", "after_shards", "after_rename", "during_swap", "after_latest", "during_prune")
"""Named moments of a save, in order (``during_swap`` only when re-saving an existing step)."""

save_point_hook: Optional[Callable[[str, str], None]] = None
"""Called as ``hook(point, directory)`` at each of :data:`SAVE_POINTS`; tests kill a save there."""


def _reached(point: str, directory: str) -> None:
    if save_point_hook is not None:
        save_point_hook(point, directory)


def save_checkpoint(
    save_dir: str,
    step: int,
    chunks: List[torch.nn.Module],
    optimizer,
    scheduler,
    model_config: ConanModelConfig,
    consumed_samples: int,
    extra_state: Optional[Dict[str, Any]] = None,
    keep_last: int = 2,
    write_extra_files: Optional[Callable[[str], None]] = None,
) -> str:
    """Collective. Write a complete checkpoint for `step`, then move `latest` to it.

    `write_extra_files(directory)` is called on every rank with the in-progress checkpoint
    directory once the model, optimizer, RNG and common state are in it: files a stage writes there
    are published (or lost to a kill) together with the rest of the checkpoint.
    """
    rank = dist.get_rank()
    final = os.path.join(save_dir, checkpoint_name(step))
    partial = final + PARTIAL
    run_id = _from_rank_zero(_prepare(save_dir, final) if rank == 0 else None)
    _reached("before_shards", partial)
    dist_checkpointing.save(sharded_state(chunks, optimizer, is_loading=False), os.path.join(partial, SHARDS_DIR))
    torch.save(rng_state(), rng_file(partial, rank))
    if rank == 0:
        torch.save(common_state(step, consumed_samples, scheduler, model_config, extra_state),
                   os.path.join(partial, COMMON_FILE))
        write_layout(partial, run_id)
    if write_extra_files is not None:
        write_extra_files(partial)
    dist.barrier()
    # every rank, once all files exist: on a file system shared by several hosts a file's data is
    # durable only once the host that wrote it has synced it
    atomic_write.fsync_tree(partial)
    dist.barrier()
    _reached("after_shards", partial)
    if rank == 0:
        publish(partial, final)
        write_latest(save_dir, step)
        _reached("after_latest", final)
        prune(save_dir, step, keep_last, run_id)
    dist.barrier()
    logger.info("saved checkpoint %s", final)
    return final


def _prepare(save_dir: str, final: str) -> Tuple[Optional[str], Optional[str]]:
    """Rank 0 before a save: clear what killed saves left and create the ``.partial`` directories.
    Returns (the run id the checkpoint records, None), or (None, why the save is refused)."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        recover(save_dir)
        run_id = current_run_id(save_dir)
        if os.path.isdir(final) and checkpoint_owner(final) not in (None, run_id):
            return None, (f"{final} was written by another run (its {LAYOUT_FILE} names another run id): "
                          f"move it out of {save_dir} or save elsewhere")
        os.makedirs(os.path.join(final + PARTIAL, SHARDS_DIR))
        os.makedirs(os.path.join(final + PARTIAL, RNG_DIR))
    except InputError as error:
        return None, str(error)
    return run_id, None


def _from_rank_zero(prepared: Optional[Tuple[Optional[str], Optional[str]]]) -> str:
    """Every rank gets rank 0's run id, or the same error when rank 0 refused the save (the
    broadcast is the barrier before the shards: no rank hangs waiting for a rank that stopped)."""
    shared = [prepared]
    current_placement().broadcast_object_list(shared, src=0)
    run_id, problem = shared[0]
    if problem is not None:
        raise InputError(problem)
    return run_id


def current_run_id(save_dir: str) -> str:
    """The run id saves into `save_dir` record: that of the checkpoint ``latest`` names, so a resumed
    run keeps it, or a new one (an empty directory, or a ``latest`` written before run ids)."""
    latest = read_latest(save_dir)
    return (checkpoint_owner(latest) if latest else None) or uuid.uuid4().hex


def publish(partial: str, final: str) -> None:
    """Rename the finished `partial` to `final`; an existing `final` stays whole until replaced."""
    if not os.path.exists(final):
        atomic_write.rename(partial, final)
        _reached("after_rename", final)
        return
    # `latest` may name `final`: it must stay loadable at every moment (read_latest's `.next` rule)
    staged, retired = final + NEXT, final + OLD
    atomic_write.rename(partial, staged)
    _reached("after_rename", staged)
    atomic_write.rename(final, retired)
    _reached("during_swap", staged)
    atomic_write.rename(staged, final)
    shutil.rmtree(retired)


def recover(save_dir: str) -> None:
    """Clear what killed saves left: unfinished `.partial`s and `.old`s; finish an interrupted swap.
    Only names a save makes (``iter_<digits>`` with its suffixes) are touched: a user's
    ``notes.next`` or ``photos.old/`` stays as it is."""
    for entry in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, entry)
        if not LEFTOVER_RE.match(entry):
            continue
        if entry.endswith(NEXT):
            final = path[:-len(NEXT)]
            if os.path.isdir(final):  # the swap had not begun: the old copy is whole, drop the new one
                shutil.rmtree(path)
            else:
                atomic_write.rename(path, final)
        elif entry.endswith((PARTIAL, OLD)) and os.path.isdir(path):
            shutil.rmtree(path)


def prune(save_dir: str, step: int, keep_last: int, run_id: str) -> None:
    """Delete this run's checkpoints older than the `keep_last` newest up to `step` (never `step`
    itself). A checkpoint whose ``layout.json`` does not name `run_id` (another run's, one copied in,
    one written before run ids) is never deleted and does not count.

    Checkpoints of later steps (written by a killed run before its `latest` moved) are left alone: a
    resumed run re-saves them when it gets there.
    """
    if keep_last <= 0:
        return
    steps = sorted(int(m.group(1)) for m in map(ITER_RE.match, os.listdir(save_dir))
                   if m and checkpoint_owner(os.path.join(save_dir, m.group(0))) == run_id)
    for old in [s for s in steps if s <= step][:-keep_last]:
        path = os.path.join(save_dir, checkpoint_name(old))
        atomic_write.rename(path, path + OLD)  # the rename makes a half-deleted checkpoint unmistakable
        _reached("during_prune", path + OLD)
        shutil.rmtree(path + OLD)
