"""Resumable training checkpoints on megatron-core ``dist_checkpointing``.

Layout of ``<save_dir>``::

    latest                    text: name of the newest *complete* checkpoint, e.g. "iter_0000040"
    latest_checkpointed_iteration.txt   the same step as a bare number ("40"), for Megatron-LM's tools
    iter_0000040/
        model_optim/          dist_checkpointing: {"model": …, "optimizer": …} sharded by layout
        common.pt             rank 0: step, consumed samples, scheduler, model config, extra state
        rng/rank_00003.pt     each rank's Python / NumPy / torch / megatron-tracker RNG states
        layout.json           the TP/PP/DP layout that wrote it
        …                     files a stage writes itself (``write_extra_files``)
    iter_0000050.partial/     a save in progress (or killed): never read, removed by the next save
    iter_0000040.next/        a complete re-save of step 40 moving in (see below)
    iter_0000030.old/         a checkpoint being deleted (pruned, or replaced by a re-save)

A save writes everything into ``iter_N.partial``; after a barrier rank 0 renames it to ``iter_N``
and only then rewrites ``latest`` and ``latest_checkpointed_iteration.txt`` (each: write to a temp
file, fsync, rename). A kill at any point leaves ``latest`` naming a complete checkpoint. After
``latest`` moves, checkpoints beyond ``keep_last`` are renamed to ``.old`` and deleted, oldest first.

Re-saving a step whose ``iter_N`` exists (a signal right after a periodic save, or a resumed run
reaching a step a killed run had already written) never deletes the old copy before the new one is
complete: the finished ``.partial`` becomes ``iter_N.next``, the old ``iter_N`` becomes
``iter_N.old``, then ``iter_N.next`` becomes ``iter_N``. A kill between the last two renames leaves
``latest`` naming the missing ``iter_N``; :func:`read_latest` then returns the complete
``iter_N.next``, and the next save finishes the move.

Loading under another TP/PP/VPP layout works for the model and optimizer (dist_checkpointing
reshards: the stored keys are the layers' global names, whatever the chunking); per-rank RNG states
are then not restorable and are re-seeded, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from typing import Any, Callable, Dict, List, Optional

import numpy
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

from megatron_conan.config.model import ConanModelConfig
from megatron_conan.errors import CheckpointMismatchError, InputError
from megatron_conan.training.model_checkpoint import load_model_state, model_sharded_state_dict

logger = logging.getLogger(__name__)

LATEST = "latest"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's marker: the step of the newest complete checkpoint as a bare number."""
PARTIAL, NEXT, OLD = ".partial", ".next", ".old"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")

SAVE_POINTS = ("before_shards", "after_shards", "after_rename", "during_swap", "after_latest", "during_prune")
"""Named moments of a save, in order (``during_swap`` only when re-saving an existing step)."""

save_point_hook: Optional[Callable[[str, str], None]] = None
"""Called as ``hook(point, directory)`` at each of :data:`SAVE_POINTS`; tests kill a save there."""


def _reached(point: str, directory: str) -> None:
    if save_point_hook is not None:
        save_point_hook(point, directory)


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def read_latest(save_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint, or None when `save_dir` has none."""
    marker = os.path.join(save_dir, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker, encoding="utf-8") as handle:
        name = handle.read().strip()
    path = os.path.join(save_dir, name)
    if _ITER_RE.match(name):
        if os.path.isdir(path):
            return path
        if os.path.isdir(path + NEXT):  # a re-save stopped between moving the old copy out and the new in
            return path + NEXT
    raise InputError(f"{marker} names {name!r}, which is not a complete checkpoint in {save_dir}")


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _rng_state() -> Dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> Dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
    }


def _sharded(chunks, optimizer, is_loading: bool) -> Dict[str, Any]:
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        # fully_reshardable: the distributed optimizer's state in a layout-free form, so a
        # checkpoint loads under any TP/PP/DP (its default format is refused by dist_checkpointing).
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True},
        )
    return state


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
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        _recover(save_dir)
        os.makedirs(os.path.join(partial, "model_optim"))
        os.makedirs(os.path.join(partial, "rng"))
    dist.barrier()
    _reached("before_shards", partial)
    dist_checkpointing.save(_sharded(chunks, optimizer, is_loading=False), os.path.join(partial, "model_optim"))
    torch.save(_rng_state(), os.path.join(partial, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        torch.save({
            "step": step,
            "consumed_samples": consumed_samples,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "model_config": dataclasses.asdict(model_config),
            "extra": extra_state or {},
        }, os.path.join(partial, "common.pt"))
        with open(os.path.join(partial, "layout.json"), "w", encoding="utf-8") as handle:
            json.dump(_layout(), handle)
    if write_extra_files is not None:
        write_extra_files(partial)
    dist.barrier()
    _reached("after_shards", partial)
    if rank == 0:
        _publish(partial, final)
        _write_atomically(os.path.join(save_dir, LATEST), checkpoint_name(step) + "\n")
        _write_atomically(os.path.join(save_dir, MEGATRON_TRACKER), f"{step}\n")
        _reached("after_latest", final)
        _prune(save_dir, step, keep_last)
    dist.barrier()
    logger.info("saved checkpoint %s", final)
    return final


def _publish(partial: str, final: str) -> None:
    """Rename the finished `partial` to `final`; an existing `final` stays whole until replaced."""
    if not os.path.exists(final):
        os.replace(partial, final)
        _reached("after_rename", final)
        return
    # `latest` may name `final`: it must stay loadable at every moment (read_latest's `.next` rule)
    staged, retired = final + NEXT, final + OLD
    os.replace(partial, staged)
    _reached("after_rename", staged)
    os.replace(final, retired)
    _reached("during_swap", staged)
    os.replace(staged, final)
    shutil.rmtree(retired)


def _recover(save_dir: str) -> None:
    """Clear what killed saves left: unfinished `.partial`s and `.old`s; finish an interrupted swap."""
    for entry in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, entry)
        if entry.endswith(NEXT):
            final = path[:-len(NEXT)]
            if os.path.isdir(final):  # the swap had not begun: the old copy is whole, drop the new one
                shutil.rmtree(path)
            else:
                os.replace(path, final)
        elif entry.endswith((PARTIAL, OLD)) and os.path.isdir(path):
            shutil.rmtree(path)


def _prune(save_dir: str, step: int, keep_last: int) -> None:
    """Delete checkpoints older than the `keep_last` newest up to `step` (never `step` itself).

    Checkpoints of later steps (written by a killed run before its `latest` moved) are left alone: a
    resumed run re-saves them when it gets there.
    """
    if keep_last <= 0:
        return
    steps = sorted(int(m.group(1)) for m in map(_ITER_RE.match, os.listdir(save_dir)) if m)
    for old in [s for s in steps if s <= step][:-keep_last]:
        path = os.path.join(save_dir, checkpoint_name(old))
        os.replace(path, path + OLD)  # the rename makes a half-deleted checkpoint unmistakable
        _reached("during_prune", path + OLD)
        shutil.rmtree(path + OLD)


_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
                 "ffn_hidden_size", "vocab_size", "tie_embeddings")


def check_model_config(saved: Dict[str, Any], current: ConanModelConfig, path: str) -> None:
    """Raise CheckpointMismatchError naming every shape field that differs."""
    differences = [
        f"{name}: checkpoint {saved.get(name)!r} vs model {getattr(current, name)!r}"
        for name in _SHAPE_FIELDS if saved.get(name) != getattr(current, name)
    ]
    if differences:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for a different model shape: " + "; ".join(differences)
        )


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state (torch Adam creates it lazily) and cannot
    describe its sharded state for loading: give it placeholder state, overwritten by the load."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _keep_torch_adam_step_on_load(optimizer) -> None:
    """megatron-core 0.16.1, distributed optimizer over torch's Adam (no Apex / TE), two load bugs:
    the fully-reshardable load copies every per-parameter state entry from the checkpoint, but
    torch's per-parameter ``step`` is kept elsewhere in that format (KeyError 'step'); and the step
    that ``load_state_dict`` restores is one tensor shared by all parameters, so Adam's in-place
    increments corrupt the bias correction after a resume. Each parameter keeps its own copy of the
    restored step."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(inner, "_set_main_param_and_optimizer_states") or inner.config.use_precision_aware_optimizer:
            continue
        original = inner._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, inner=inner, original=original):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
            state = inner.optimizer.state[main_param]
            if "step" in state:
                # load_state_dict gives every parameter the *same* step tensor, which torch's Adam
                # then increments in place once per parameter: each needs its own.
                state["step"] = state["step"].clone()
                if "step" not in tensors:
                    tensors = {**tensors, "step": state["step"]}
            return original(model_param, tensors)

        inner._set_main_param_and_optimizer_states = set_states


def restore_scheduler(scheduler, state: Dict[str, Any]) -> None:
    """Put a saved LR schedule's position into `scheduler`. megatron-core's load_state_dict *adds*
    the saved step count to the current one, and a fresh schedule already stands at one step
    (``loop.build_scheduler``): count from zero."""
    scheduler.num_steps = 0
    scheduler.load_state_dict(state)


def load_checkpoint(
    path: str,
    chunks: List[torch.nn.Module],
    optimizer,
    scheduler,
    model_config: ConanModelConfig,
    weights_only: bool = False,
) -> Dict[str, Any]:
    """Collective. Restore a checkpoint (any layout); returns its common state (step, consumed…)
    with ``"path"``: the checkpoint directory, where a stage reads the files it wrote there."""
    if not os.path.isfile(os.path.join(path, "common.pt")):
        raise InputError(f"{path} is not a checkpoint directory (no common.pt in it)")
    common = torch.load(os.path.join(path, "common.pt"), weights_only=False)
    check_model_config(common["model_config"], model_config, path)
    with open(os.path.join(path, "layout.json"), encoding="utf-8") as handle:
        saved_layout = json.load(handle)
    if not weights_only:
        _materialise_optimizer_state(optimizer)
    state = _sharded(chunks, None if weights_only else optimizer, is_loading=True)
    loaded = dist_checkpointing.load(state, os.path.join(path, "model_optim"))
    load_model_state(chunks, loaded)
    if weights_only:
        return {"step": 0, "consumed_samples": 0, "extra": {}, "path": path}
    _keep_torch_adam_step_on_load(optimizer)
    optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and common["scheduler"] is not None:
        restore_scheduler(scheduler, common["scheduler"])
    if saved_layout == _layout():
        _set_rng_state(torch.load(os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt"),
                                  weights_only=False))
    elif dist.get_rank() == 0:
        logger.warning("checkpoint layout %s differs from this run's %s: RNG states re-seeded, "
                       "not restored", saved_layout, _layout())
    common["path"] = path
    return common
