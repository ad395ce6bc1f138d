"""Checkpoints outside a training run, for the converters and evaluators: load one's weights in one
process, and write a new one that the training stages start from (``checkpoint.load_dir``).

Loading goes through megatron-core ``dist_checkpointing`` into a TP1/PP1 model in a world of one
process, which reshards whatever layout wrote the checkpoint (TP2, TP2xPP2, ...). Writing builds the
model at the requested TP/PP in a world of ``tp * pp`` processes (spawned here when the caller runs a
single process) and saves with :func:`megatron_conan.checkpoint.save.save_checkpoint`, so the result
has the full layout of a training checkpoint: ``latest``, ``iter_0000000/model_optim``,
``common.pt`` (with ``model_config``), ``layout.json``, RNG states.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Dict, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_conan.checkpoint.load import load_checkpoint
from megatron_conan.checkpoint.metadata import CheckpointInfo
from megatron_conan.checkpoint.save import save_checkpoint
from megatron_conan.config.model import ConanModelConfig, ParallelConfig
from megatron_conan.models.transformer_config import build_transformer_config
from megatron_conan.distributed.cpu_compat import enable_cpu_compat
from megatron_conan.distributed.parallel import (
    default_backend,
    init_process_group_from_env,
    initialize_model_parallel,
)
from megatron_conan.distributed.spawn import run_distributed
from megatron_conan.errors import CheckpointMismatchError, InputError
from megatron_conan.models.conan import build_model_chunks
from megatron_conan.models.sharding import gather_full_state_dict, load_full_state_dict

logger = logging.getLogger(__name__)

IMPORT_STEP = 0
"""Step number of a checkpoint written by an import."""


# -- a world to load in ----------------------------------------------------------------------------

@contextlib.contextmanager
def model_parallel_world(parallel: Optional[ParallelConfig] = None) -> Iterator[None]:
    """megatron-core's groups for `parallel` (default TP1/PP1) around the body.

    With no process group yet, this process becomes a world of one: from RANK/WORLD_SIZE when a
    launcher set them, else over an in-process store (no port, no environment variables left
    behind). Whatever this function created it tears down on exit.
    """
    parallel = parallel or ParallelConfig()
    created_world = not dist.is_initialized()
    if created_world:
        enable_cpu_compat()
        if "RANK" in os.environ:
            init_process_group_from_env()
        else:
            dist.init_process_group(backend=default_backend(), store=dist.HashStore(), rank=0, world_size=1)
    had_groups = parallel_state.model_parallel_is_initialized()
    initialize_model_parallel(parallel)
    try:
        yield
    finally:
        if not had_groups and parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if created_world and dist.is_initialized():
            dist.destroy_process_group()


def require_single_process() -> None:
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise InputError(f"loading a checkpoint for conversion or evaluation runs in one process; this "
                         f"world has {dist.get_world_size()} (run the tool without torchrun)")


def build_model(model_config: ConanModelConfig, precision: str = "fp32", core_attention=None,
                parallel: Optional[ParallelConfig] = None) -> list:
    """This rank's model chunks for `parallel` (groups must exist); weights are to be loaded.

    A TP1 model skips the random initialisation (minutes at 1.4B on a CPU). Under tensor
    parallelism megatron-core marks a parameter as sharded only while initialising it, and the
    layout-free state-dict functions need those marks, so a sharded model is initialised.
    """
    parallel = parallel or ParallelConfig()
    transformer_config = build_transformer_config(
        model_config, parallel, precision=precision,
        transformer_overrides={"perform_initialization": parallel.tensor_parallel > 1})
    return build_model_chunks(model_config, transformer_config, core_attention=core_attention)


def load_checkpoint_model(info: CheckpointInfo, precision: str = "fp32", core_attention=None) -> torch.nn.Module:
    """The TP1/PP1 GPTModel with the checkpoint's weights (inside :func:`model_parallel_world`)."""
    require_single_process()
    chunks = build_model(info.model_config, precision, core_attention)
    load_checkpoint(info.path, chunks, None, None, info.model_config, weights_only=True)
    (model,) = chunks
    return model


def read_full_state_dict(info: CheckpointInfo) -> Dict[str, torch.Tensor]:
    """The checkpoint's full (TP1/PP1-named, unpadded) weights as fp32 CPU tensors, any saved layout."""
    with model_parallel_world():
        model = load_checkpoint_model(info)
        return gather_full_state_dict([model], info.model_config)


# -- writing a checkpoint the training stages start from ------------------------------------------

def write_checkpoint(full_state_dict: Dict[str, torch.Tensor], model_config: ConanModelConfig, save_dir: str,
                     extra: Dict[str, Any]) -> None:
    """Collective inside a world whose groups are set up: shard `full_state_dict` to this layout and
    save it as step :data:`IMPORT_STEP` of `save_dir` (``latest`` written last)."""
    parallel = ParallelConfig(tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
                              pipeline_parallel=parallel_state.get_pipeline_model_parallel_world_size())
    chunks = build_model(model_config, parallel=parallel)
    try:
        load_full_state_dict(chunks, full_state_dict, model_config)
    except (KeyError, ValueError) as error:
        raise CheckpointMismatchError(f"weights do not fit the model: {error}") from None
    save_checkpoint(save_dir, IMPORT_STEP, chunks, None, None, model_config, consumed_samples=0,
                    extra_state=extra, keep_last=0)


def _write_checkpoint_body(rank: int, world_size: int, load_state: Callable[[], Dict[str, torch.Tensor]],
                           model_config: ConanModelConfig, save_dir: str, extra: Dict[str, Any],
                           parallel: ParallelConfig) -> None:
    initialize_model_parallel(parallel)
    write_checkpoint(load_state(), model_config, save_dir, extra)


def write_checkpoint_at_layout(load_state: Callable[[], Dict[str, torch.Tensor]], model_config: ConanModelConfig,
                               save_dir: str, parallel: ParallelConfig, extra: Dict[str, Any]) -> None:
    """Write a checkpoint at `parallel`'s TP/PP from the full state dict `load_state()` returns.

    TP1/PP1 runs in this process; larger layouts spawn a world of ``tp * pp`` local processes, each
    calling `load_state` itself (a picklable callable: the weights are read, not shipped).
    """
    parallel.validate_for_model(model_config)
    if parallel.virtual_pipeline_parallel or parallel.sequence_parallel or parallel.use_distributed_optimizer:
        raise InputError("an imported checkpoint takes only tensor and pipeline parallel sizes; a run "
                         "loads it under any virtual-pipeline / sequence-parallel / optimizer setting")
    world_size = parallel.tensor_parallel * parallel.pipeline_parallel
    if world_size == 1:
        with model_parallel_world():
            require_single_process()
            write_checkpoint(load_state(), model_config, save_dir, extra)
        return
    run_distributed(_write_checkpoint_body, world_size,
                    args=(load_state, model_config, save_dir, extra, parallel), timeout_s=3600.0)
