"""Process-group set-up for every entry point and test: torch.distributed, then megatron-core's
model-parallel groups, then the model-parallel RNG seeds.

On a CPU-only machine the backend is gloo and :mod:`megatron_conan.distributed.cpu_compat` is
enabled first; with GPUs it is NCCL and each process binds to its LOCAL_RANK device. A launcher
that starts more processes on a node than it has GPUs is refused in one line (:func:`bind_local_gpu`):
binding two ranks to one GPU fails inside NCCL, and a silent fallback to gloo would put the weights on
the GPU and the batches on the CPU. To run such a world on the CPU, hide the GPUs
(``CUDA_VISIBLE_DEVICES=``).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_conan.config.model import ParallelConfig
from megatron_conan.distributed.cpu_compat import enable_cpu_compat
from megatron_conan.distributed.ports import keep_gloo_on_loopback
from megatron_conan.errors import ConfigError

logger = logging.getLogger(__name__)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group_from_env(backend: Optional[str] = None, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun, srun);
    the rendezvous and every collective of the default group wait at most `timeout_s` for the other
    ranks (a stage passes ``parallel.timeout_s``).

    With none of them set, starts a world of one (RANK=0, WORLD_SIZE=1 in the environment) over an
    in-process store: no port. (A port picked free, released and bound later can be taken in
    between by another process; left in MASTER_PORT, it was bound again by the next start in this
    process, which failed with EADDRINUSE whenever another process held it by then.)
    """
    if dist.is_initialized():
        return
    enable_cpu_compat()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if torch.cuda.is_available():
        bind_local_gpu(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_s)
    keep_gloo_on_loopback(os.environ.get("MASTER_ADDR", ""))  # every rank on this host: gloo stays on it
    if os.environ.get("WORLD_SIZE") == "1" and "MASTER_PORT" not in os.environ:
        dist.init_process_group(backend=backend or default_backend(), store=dist.HashStore(), rank=0,
                                world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend=backend or default_backend(), timeout=timeout)


def bind_local_gpu(local_rank: int, gpus: int) -> None:
    """Make GPU `local_rank` this process's device, or refuse when the node has no such GPU."""
    if local_rank >= gpus:
        raise ConfigError(
            f"LOCAL_RANK {local_rank} has no GPU: this node shows {gpus} CUDA device(s), and NCCL needs one per "
            f"process; start at most {gpus} process(es) per node, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to "
            "run on the CPU over gloo")
    torch.cuda.set_device(local_rank)


def initialize_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> int:
    """Create megatron-core's TP/PP/DP groups for `parallel` and seed the RNGs; returns DP size."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        init_process_group_from_env()
    enable_cpu_compat()
    data_parallel = parallel.data_parallel(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        # megatron-core's groups wait 30 minutes by default; the layout's own timeout instead
        distributed_timeout_minutes=parallel.timeout_s / 60.0,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return data_parallel


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def describe_layout() -> str:
    """One line with this rank's coordinates in the parallel layout."""
    from megatron.core import parallel_state as ps

    return (
        f"rank {dist.get_rank()}/{dist.get_world_size()}: "
        f"tp {ps.get_tensor_model_parallel_rank()}/{ps.get_tensor_model_parallel_world_size()} "
        f"pp {ps.get_pipeline_model_parallel_rank()}/{ps.get_pipeline_model_parallel_world_size()} "
        f"dp {ps.get_data_parallel_rank()}/{ps.get_data_parallel_world_size()}"
    )
