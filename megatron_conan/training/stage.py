"""The seam between the shared Trainer and a stage (pretrain, SFT, embed-weak, embed-sup).

The Trainer (``training/trainer.py``, with its callbacks) owns what every stage needs alike: process
groups, the model and its wrappers, optimizer and LR schedule, checkpoints, preemption, the
non-finite guard, metrics and the device placement. A stage plugs in what differs:

    check_config(cfg)        refuse options the stage cannot honour, before anything is built
    check_inputs(cfg, model) check the tokenizer and data files against the model and each other
    core_attention(cfg)      the attention kernel slot of the model (soft mask for embedding stages)
    transformer_overrides()  megatron-core TransformerConfig fields the stage needs
    setup(ctx)               build what it needs from the run config, once the model exists
    build_loader(ctx)        its data loader (None: the stage reads its own data), which the Trainer
                             holds, reads ahead (``train.prefetch``) and checkpoints
    train_step(ctx, step, batch)  this step's forward + loss + backward over the global batch (its
                             rank's part: the loader's next batch, None without a loader); gradients
                             reduced over DP (finalize_model_grads), no optimizer update
    evaluate(ctx, step)      optional held-out numbers (a stage that has them sets `evaluates`)
    describe_batch(cfg, n)   its batch for the --dry-run report, planned for n GPUs
    state_dict()             its own position and extra state (an LM stage's data cursor), checkpointed
    load_state_dict(state)   the same, restored before the first step of a resumed run
    write_checkpoint_files / read_checkpoint_files   optional per-rank files inside a checkpoint

A stage moves its batches to ``ctx.placement.device`` (``ctx.placement.to_device``) and issues its
collectives through the placement. The Trainer persists the soft-mask schedule with the model (it lives
in the attention modules); a stage that moves a(t) does so in ``train_step``.
(torchtitan's trainer and OLMo-core's ``TrainModule`` follow the same split.)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional

import torch
from torch.distributed import ProcessGroup

from megatron_conan.config.model import ConanModelConfig
from megatron_conan.config.run import RunConfig
from megatron_conan.data.prefetch import StatefulLoader
from megatron_conan.distributed.device import Placement

if TYPE_CHECKING:  # megatron-core's transformer package is heavy to import and only a type here
    from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class StageContext:
    """What the loop hands a stage: the run, the model and where tensors go."""

    cfg: RunConfig
    """The run's config (the stage's subclass of RunConfig)."""
    model_config: ConanModelConfig
    """Vocabulary size and shape of the model."""
    transformer_config: TransformerConfig
    """megatron-core's config of the built model."""
    chunks: List[torch.nn.Module]
    """The DDP-wrapped model chunks of this rank (one unless interleaving)."""
    placement: Placement
    """Device of the batches and collective buffers."""
    data_parallel_rank: int
    data_parallel_size: int
    data_parallel_group: Optional[ProcessGroup]
    """The process group of the data-parallel replicas (gathers of contrastive candidates)."""
    total_steps: int
    """Optimizer steps of the whole run."""


@dataclass
class StageStepOutput:
    """What a stage's ``train_step`` reports; identical on every rank."""

    loss: float
    """The step's loss over the global batch (NaN/inf makes the loop skip the update)."""
    samples: int
    """Examples of the global batch (all DP ranks)."""
    tokens: int
    """Tokens the model processed for the global batch (for tokens/s and MFU)."""
    metrics: Dict[str, float] = field(default_factory=dict)
    """Other numbers to log (accuracy, a(t), DHNM activity, ...)."""


@dataclass
class BatchPlan:
    """How a stage's step reads its batch, for the --dry-run report."""

    micro_batch_size: int
    """Sequences per forward pass of one GPU (sizes the activations)."""
    description: Optional[str] = None
    """A line on the batch's make-up, where the report's layout lines do not say it all."""


class Stage(abc.ABC):
    """A training stage plugged into :class:`megatron_conan.training.trainer.Trainer`."""

    name: str = "stage"
    evaluates: bool = False
    """True when :meth:`evaluate` has held-out numbers (``train.eval_interval`` is refused otherwise)."""

    def check_config(self, cfg) -> None:
        """Raise ConfigError for options this stage cannot honour (called before anything is built)."""

    def check_inputs(self, cfg, model_config) -> None:
        """Check the run's files against each other before anything is built (tokenizer vs model
        vocabulary, data vs tokenizer): a mismatch is one clear error, not a crash deep in a step."""

    def core_attention(self, cfg):
        """The model's core-attention spec (None: the builder's default attention)."""
        return None

    def transformer_overrides(self) -> Dict[str, object]:
        """megatron-core TransformerConfig fields this stage sets."""
        return {}

    @abc.abstractmethod
    def setup(self, ctx: StageContext) -> None:
        """Build what the stage needs (its data, unless :meth:`build_loader` gives it) once the
        model exists."""

    def build_loader(self, ctx: StageContext) -> Optional[StatefulLoader]:
        """The stage's data loader (called after :meth:`setup`): an iterator of this rank's batches
        that never communicates, with ``state_dict`` / ``load_state_dict``. The Trainer holds it,
        hands its next batch to :meth:`train_step`, and saves and restores its position with the
        checkpoint. None: the stage reads its own data (:meth:`train_step` gets None)."""
        return None

    @abc.abstractmethod
    def train_step(self, ctx: StageContext, step: int, batch: Optional[object] = None) -> StageStepOutput:
        """Forward, loss and backward of step `step` (0-based) over the global batch (`batch`: this
        rank's part, from :meth:`build_loader`'s loader); gradients are reduced over DP when this
        returns; the loop applies the optimizer update."""

    def evaluate(self, ctx: StageContext, step: int) -> Dict[str, float]:
        """Held-out metrics after step `step`; the default stage has none."""
        return {}

    def describe_batch(self, cfg, world_size: int) -> BatchPlan:
        """The batch of one step on `world_size` GPUs (pure arithmetic; nothing is read)."""
        return BatchPlan(micro_batch_size=cfg.train.micro_batch_size)

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, object]:
        """The stage's resumable state (rank-0 copy; identical on every rank unless stated); the
        loader's position is the Trainer's to save, not part of it."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict` output before the first step of a resumed run."""

    def write_checkpoint_files(self, directory: str) -> None:
        """Collective: write per-rank state into the in-progress checkpoint `directory` (optional)."""

    def read_checkpoint_files(self, directory: str) -> None:
        """Collective: read what :meth:`write_checkpoint_files` wrote, on resume (optional)."""

    def close(self) -> None:
        """Release resources at the end of the run."""

