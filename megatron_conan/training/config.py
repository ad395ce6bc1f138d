"""Run configuration shared by the stage entry points (one YAML recipe per run, see examples/)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from megatron_conan.config.model import ConanModelConfig, ConfigError, ParallelConfig, model_recipe


@dataclass
class ModelSection:
    """Which model: a named recipe plus field overrides."""

    recipe: str = "tiny"
    """`conan_1p4b` or `tiny`."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """ConanModelConfig fields to change (e.g. vocab_size to match a tokenizer)."""
    transformer_overrides: Dict[str, Any] = field(default_factory=dict)
    """Extra megatron-core TransformerConfig fields (e.g. recompute_granularity)."""
    soft_mask: Optional[Dict[str, Any]] = None
    """SoftMaskConfig fields: use the soft-mask attention kernel as core attention (stages 3-4;
    the loop moves a(t) with the step and checkpoints the schedule). None: megatron-core's."""

    def core_attention(self):
        """The core-attention spec for the model builder (None: the builder's default)."""
        if self.soft_mask is None:
            return None
        from megatron_conan.ops.soft_mask_attention.core_attention import soft_mask_core_attention_spec
        from megatron_conan.ops.soft_mask_attention.schedule import SoftMaskConfig

        try:
            config = SoftMaskConfig(**self.soft_mask)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.soft_mask: {error}") from None
        return soft_mask_core_attention_spec(config)

    def build(self) -> ConanModelConfig:
        cfg = model_recipe(self.recipe)
        for key, value in self.overrides.items():
            if not hasattr(cfg, key):
                raise ConfigError(f"unknown config keys: model.overrides.{key}")
            setattr(cfg, key, value)
        cfg.__post_init__()
        return cfg


@dataclass
class OptimizerSection:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    weight_decay: float = 0.001
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    warmup_fraction: float = 0.05
    """Linear warm-up over this fraction of train_steps."""
    decay_style: str = "cosine"
    """After warm-up: `cosine`, `linear` or `constant`."""

    def __post_init__(self):
        if self.decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optimizer.decay_style must be cosine, linear or constant, got {self.decay_style!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"optimizer.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")


@dataclass
class TrainSection:
    """Batching, length, precision and cadence."""

    train_steps: int = 100
    """Optimizer steps (derived from token_budget when that is set)."""
    token_budget: Optional[float] = None
    """Train for this many tokens instead of train_steps (e.g. 3e12)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all DP ranks."""
    micro_batch_size: int = 2
    """Sequences per forward pass per DP rank."""
    seq_length: int = 64
    """Tokens per sequence."""
    precision: str = "fp32"
    """`bf16`, `fp16` or `fp32`."""
    recompute: str = "none"
    """Activation recomputation: `none`, `selective` (attention core) or `full` (every layer)."""
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 0
    """Evaluate every N steps (0: never)."""
    eval_steps: int = 2
    """Global batches per evaluation."""
    max_consecutive_nonfinite: int = 5
    """Stop after this many non-finite losses in a row."""
    exit_after_steps: Optional[int] = None
    """Stop (after a checkpoint) once this step is reached: for tests and time-sliced jobs."""
    wandb_project: Optional[str] = None
    """Also log to this W&B project when the `wandb` package is installed (TensorBoard always)."""

    def __post_init__(self):
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"train.recompute must be none, selective or full, got {self.recompute!r}")
        if self.global_batch_size % self.micro_batch_size != 0:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) is not divisible by "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )

    def steps(self) -> int:
        if self.token_budget:
            return int(math.ceil(self.token_budget / (self.global_batch_size * self.seq_length)))
        return self.train_steps

    def num_microbatches(self, data_parallel: int) -> int:
        per_step = self.micro_batch_size * data_parallel
        if self.global_batch_size % per_step != 0:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) is not divisible by "
                f"train.micro_batch_size * data-parallel size ({self.micro_batch_size} * {data_parallel})"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointSection:
    """Where and how often to save; resume is automatic from `<save_dir>/latest`."""

    save_dir: Optional[str] = None
    """Checkpoint directory (default: <run_dir>/checkpoints)."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on signals)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a newer one completes."""
    load_dir: Optional[str] = None
    """Initialise from this checkpoint (e.g. the pretrained model for SFT) when save_dir has none."""
    load_weights_only: bool = True
    """With load_dir: take only the model weights (new optimizer, schedule and data position)."""


@dataclass
class DataSection:
    """Stage data: blended indexed prefixes (pretrain) or an SFT prefix; `synthetic` for smoke runs."""

    kind: str = "synthetic"
    """`blended` (pretraining), `sft`, or `synthetic` (random tokens, no files)."""
    tokenizer: Optional[str] = None
    """SentencePiece model path (vocab_size of the model follows it when set)."""
    blend: Dict[str, Any] = field(default_factory=dict)
    """BlendedDataConfig fields for kind=blended (sources, split, cache_dir, seed)."""
    sft_prefix: Optional[str] = None
    """Indexed SFT data prefix for kind=sft."""
    split: str = "98,2,0"
    """train,valid,test split for kind=sft."""

    def __post_init__(self):
        if self.kind not in ("blended", "sft", "synthetic"):
            raise ConfigError(f"data.kind must be blended, sft or synthetic, got {self.kind!r}")


@dataclass
class RunConfig:
    """Everything one training run needs; written resolved to <run_dir>/config.yaml."""

    run_dir: str = "runs/tiny"
    """Logs, TensorBoard events, the resolved config and (by default) checkpoints."""
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    data: DataSection = field(default_factory=DataSection)

    def checkpoint_dir(self) -> str:
        return self.checkpoint.save_dir or os.path.join(self.run_dir, "checkpoints")
