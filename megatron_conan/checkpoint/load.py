"""Collective load of a training checkpoint under any TP/PP/VPP/DP layout.

The model and optimizer reshard (dist_checkpointing stores the layers' global names, whatever the
chunking); per-rank RNG states restore only under the layout that wrote them and are otherwise
re-seeded, with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from megatron_conan.checkpoint.layout import COMMON_FILE, SHARDS_DIR, rng_file
from megatron_conan.checkpoint.metadata import check_model_config, parallel_layout, read_common, read_layout
from megatron_conan.checkpoint.rng import set_rng_state
from megatron_conan.checkpoint.safe_load import load_dist_checkpoint, load_file
from megatron_conan.checkpoint.sharded_state import load_model_state, sharded_state
from megatron_conan.config.model import ConanModelConfig
from megatron_conan.errors import InputError

logger = logging.getLogger(__name__)


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
    if not os.path.isfile(os.path.join(path, COMMON_FILE)):
        raise InputError(f"{path} is not a checkpoint directory (no {COMMON_FILE} in it)")
    common = read_common(path)
    check_model_config(common["model_config"], model_config, path)
    saved_layout = read_layout(path)
    if not weights_only:
        _materialise_optimizer_state(optimizer)
    state = sharded_state(chunks, None if weights_only else optimizer, is_loading=True)
    loaded = load_dist_checkpoint(state, os.path.join(path, SHARDS_DIR))
    load_model_state(chunks, loaded)
    if weights_only:
        return {"step": 0, "consumed_samples": 0, "extra": {}, "path": path}
    _keep_torch_adam_step_on_load(optimizer)
    optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and common["scheduler"] is not None:
        restore_scheduler(scheduler, common["scheduler"])
    if saved_layout == parallel_layout():
        set_rng_state(load_file(rng_file(path, dist.get_rank())))
    elif dist.get_rank() == 0:
        logger.warning("checkpoint layout %s differs from this run's %s: RNG states re-seeded, "
                       "not restored", saved_layout, parallel_layout())
    common["path"] = path
    return common
