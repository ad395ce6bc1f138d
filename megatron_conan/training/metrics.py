"""Training metrics: scalar logging, throughput/MFU, memory, and the non-finite-loss guard.

* :class:`TrainingLogger` writes scalars to TensorBoard and, when ``wandb`` is importable and
  enabled, to W&B. Only one process writes: by default the first TP/DP rank of the last pipeline
  stage, the rank where megatron-core's schedule produces the loss.
* :class:`ThroughputMeter` turns (tokens, seconds) into tokens/s, model TFLOP/s per GPU and MFU,
  from :func:`megatron_conan.training.dry_run.model_flops_per_token`.
* :func:`memory_metrics`: peak CUDA memory, or the process RSS on CPU.
* :class:`NonFiniteGuard`: skip steps whose loss is NaN/inf, fail after K in a row.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

logger = logging.getLogger(__name__)

H100_BF16_DENSE_PEAK_FLOPS = 989e12
"""Dense bf16 tensor-core peak of an H100 SXM, the MFU denominator of the GPU check (docs/GPU.md, part `train_step`)."""

_GIB = float(1 << 30)


def default_is_writer() -> bool:
    """True on the process that should write logs.

    With megatron-core model parallelism initialised: the last pipeline stage's TP rank 0 and DP
    rank 0. With only torch.distributed: global rank 0. Without either: True.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return dist.get_rank() == 0
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


class TrainingLogger:
    """Scalars to TensorBoard (``log_dir``) and optionally W&B, from the writer process only.

    ``is_writer`` defaults to :func:`default_is_writer`. W&B is used when ``use_wandb`` is set and
    the ``wandb`` package imports; otherwise a warning is logged and TensorBoard alone is written.
    On other processes every method is a no-op, so the training loop calls them unconditionally.
    """

    def __init__(
        self,
        log_dir: str,
        is_writer: Optional[bool] = None,
        use_wandb: bool = False,
        wandb_project: Optional[str] = None,
        wandb_run_name: Optional[str] = None,
        run_config: Optional[Mapping[str, Any]] = None,
    ):
        self.log_dir = log_dir
        self.is_writer = default_is_writer() if is_writer is None else bool(is_writer)
        self._tensorboard = None
        self._wandb_run = None
        if not self.is_writer:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(log_dir, exist_ok=True)
        self._tensorboard = SummaryWriter(log_dir=log_dir)
        if use_wandb:
            try:
                import wandb
            except ImportError:
                logger.warning("W&B logging was asked for but wandb is not installed; "
                               "logging to TensorBoard only")
            else:
                self._wandb_run = wandb.init(project=wandb_project, name=wandb_run_name,
                                             dir=log_dir, config=dict(run_config or {}),
                                             resume="allow")

    @property
    def uses_wandb(self) -> bool:
        return self._wandb_run is not None

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write each ``name: value`` at ``step`` (names may be grouped as ``train/loss``)."""
        if not self.is_writer:
            return
        values = {name: float(value) for name, value in scalars.items()}
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def log_text(self, name: str, text: str, step: int = 0) -> None:
        """A text entry (e.g. the resolved config) in TensorBoard."""
        if self.is_writer:
            self._tensorboard.add_text(name, text, global_step=step)

    def flush(self) -> None:
        if self.is_writer:
            self._tensorboard.flush()

    def close(self) -> None:
        if not self.is_writer:
            return
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        self.is_writer = False

    def __enter__(self) -> "TrainingLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Throughput:
    """Speed of one step (or an average over steps)."""

    tokens_per_second: float
    """All GPUs together."""
    tokens_per_second_per_gpu: float
    model_tflops_per_gpu: float
    """Model FLOPs (not hardware FLOPs: recomputation is not counted) per second per GPU / 1e12."""
    mfu: float
    """Model FLOPs utilisation: model FLOP/s per GPU over the GPU's peak."""

    def as_scalars(self, prefix: str = "throughput/") -> Dict[str, float]:
        return {
            f"{prefix}tokens_per_second": self.tokens_per_second,
            f"{prefix}tokens_per_second_per_gpu": self.tokens_per_second_per_gpu,
            f"{prefix}model_tflops_per_gpu": self.model_tflops_per_gpu,
            f"{prefix}mfu": self.mfu,
        }


class ThroughputMeter:
    """Tokens/s, model TFLOP/s per GPU and MFU from (tokens, seconds) per step.

    ``update`` returns the step's figures; ``average`` those over every step since construction or
    :meth:`reset` (total tokens over total time), e.g. after resetting past the warm-up steps.
    """

    def __init__(self, model_flops_per_token: float, num_gpus: int,
                 peak_flops_per_gpu: float = H100_BF16_DENSE_PEAK_FLOPS):
        if model_flops_per_token <= 0:
            raise ValueError(f"model_flops_per_token must be positive, got {model_flops_per_token}")
        if num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
        if peak_flops_per_gpu <= 0:
            raise ValueError(f"peak_flops_per_gpu must be positive, got {peak_flops_per_gpu}")
        self.model_flops_per_token = float(model_flops_per_token)
        self.num_gpus = int(num_gpus)
        self.peak_flops_per_gpu = float(peak_flops_per_gpu)
        self.reset()

    def reset(self) -> None:
        self._tokens = 0
        self._seconds = 0.0

    def measure(self, tokens: int, seconds: float) -> Throughput:
        """Figures for `tokens` trained in `seconds` over all GPUs (does not record them)."""
        if seconds <= 0:
            raise ValueError(f"step time must be positive, got {seconds} s")
        tokens_per_second = tokens / seconds
        flops_per_gpu = tokens_per_second * self.model_flops_per_token / self.num_gpus
        return Throughput(
            tokens_per_second=tokens_per_second,
            tokens_per_second_per_gpu=tokens_per_second / self.num_gpus,
            model_tflops_per_gpu=flops_per_gpu / 1e12,
            mfu=flops_per_gpu / self.peak_flops_per_gpu,
        )

    def update(self, tokens: int, seconds: float) -> Throughput:
        """Record one step and return its figures."""
        throughput = self.measure(tokens, seconds)
        self._tokens += tokens
        self._seconds += seconds
        return throughput

    def average(self) -> Optional[Throughput]:
        """Figures over all recorded steps, or None before the first."""
        if self._seconds == 0:
            return None
        return self.measure(self._tokens, self._seconds)


def memory_metrics() -> Dict[str, float]:
    """Peak memory of this process in GiB: ``memory/max_allocated_gib`` (and reserved) from
    ``torch.cuda`` when CUDA is available, else ``memory/rss_gib`` from psutil."""
    import torch

    if torch.cuda.is_available():
        return {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated() / _GIB,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved() / _GIB,
        }
    import psutil

    return {"memory/rss_gib": psutil.Process().memory_info().rss / _GIB}


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps had a NaN or infinite loss: the run has diverged."""


class NonFiniteGuard:
    """Counts non-finite losses: ``update(loss)`` says whether to skip the step.

    A finite loss resets the consecutive count. After ``max_consecutive`` non-finite losses in a
    row, :class:`NonFiniteLossError` is raised (restart from an earlier checkpoint, lower the
    learning rate, or inspect the data at that step). ``state_dict`` lets the counts survive a
    checkpoint/resume.
    """

    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def update(self, loss: Any, step: Optional[int] = None) -> bool:
        """True when `loss` (a float or a one-element tensor) is NaN/inf and the step is skipped."""
        value = float(loss)
        if math.isfinite(value):
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total_skipped += 1
        where = "" if step is None else f" at step {step}"
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive non-finite losses{where} (last {value}); "
                f"{self.total_skipped} steps skipped in total. The run has diverged: resume from an "
                "earlier checkpoint with a lower learning rate, or inspect the data of these steps")
        logger.warning("non-finite loss %s%s: skipping the step (%d in a row, limit %d)",
                       value, where, self.consecutive, self.max_consecutive)
        return True

    def state_dict(self) -> Dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])
