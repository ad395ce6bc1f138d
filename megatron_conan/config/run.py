"""Run configuration shared by the stage entry points (one YAML recipe per run, see examples/): the
sections of ``RunConfig``, each stage's config class and their checks. The data sections are
``config/data.py``; loading (YAML, overrides, types) is ``config/loader.py``; the model's
architecture and parallel layout are ``config/model.py``."""

from __future__ import annotations

import math
import os
from dataclasses import field
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence

from pydantic import Field, model_validator

from megatron_conan.config.data import ContrastiveData, LanguageModelData, SyntheticData
from megatron_conan.config.loader import apply_overrides, config_dataclass, from_dict, read_recipe, to_dict
from megatron_conan.config.model import (ConanModelConfig, ModelRecipe, ParallelConfig, Pooling, Positive,
                                         Precision, Recompute, model_recipe)
from megatron_conan.errors import ConfigError

AtLeast0 = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0)]
Above0 = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
"""In [0, 1)."""


@config_dataclass("model")
class ModelSection:
    """Which model: a named recipe plus field overrides."""

    recipe: ModelRecipe = "tiny"
    """`conan_1p4b` or `tiny`."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """ConanModelConfig fields to change (e.g. vocab_size to match a tokenizer)."""
    transformer_overrides: Dict[str, Any] = field(default_factory=dict)
    """Extra megatron-core TransformerConfig fields (e.g. recompute_granularity)."""
    transformer_engine: Optional[bool] = None
    """Transformer Engine layers: None uses them where installed; false forces megatron-core's local
    layers (the comparison run of benchmarks/train_step.py); true refuses to start without TE."""
    soft_mask: Optional[Dict[str, Any]] = None
    """SoftMaskConfig fields of the embedding stages' attention (stage 3: the causal ->
    bidirectional schedule, `total_steps` defaulting to the stage's steps minus one, so that the
    first step is causal and the last bidirectional; stage 4: bidirectional
    unless set). Pretrain and SFT refuse it. Checked and typed as SoftMaskConfig fields when the
    config loads; it stays the mapping of the keys set, laid over the stage's default."""

    @model_validator(mode="after")
    def _checked(self) -> "ModelSection":
        self.build()  # a bad override fails when the config loads
        if self.soft_mask is not None:
            from megatron_conan.ops.soft_mask_attention.schedule import SoftMaskConfig  # torch: not at config import

            checked = from_dict(SoftMaskConfig, self.soft_mask, "model.soft_mask")
            self.soft_mask = {key: getattr(checked, key) for key in self.soft_mask}  # the keys set, typed
        if self.transformer_engine:
            from megatron_conan.ops.engines import transformer_engine_available

            if not transformer_engine_available():
                raise ValueError("transformer_engine=true: Transformer Engine is not installed "
                                 "(pip install transformer-engine, or leave the field unset)")
        return self

    def build(self) -> ConanModelConfig:
        # the recipe's fields, then the overrides, converted and checked like any config value
        return from_dict(ConanModelConfig, {**to_dict(model_recipe(self.recipe)), **self.overrides},
                         "model.overrides")


@config_dataclass("optimizer")
class OptimizerSection:
    """AdamW and its learning-rate schedule."""

    lr: Above0 = 1e-4
    """Peak learning rate."""
    min_lr: NonNegative = 0.0
    """Final learning rate of the decay."""
    weight_decay: NonNegative = 0.001
    """Decoupled weight decay."""
    adam_beta1: Fraction = 0.9
    adam_beta2: Fraction = 0.95
    adam_eps: NonNegative = 1e-8
    clip_grad: NonNegative = 1.0
    """Global gradient-norm clip."""
    warmup_fraction: Fraction = 0.05
    """Linear warm-up over this fraction of train_steps."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """After warm-up: `cosine`, `linear` or `constant`."""

    @model_validator(mode="after")
    def _min_below_peak(self) -> "OptimizerSection":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr} (lr is {self.lr})")
        return self


@config_dataclass("train")
class TrainSection:
    """Batching, length, precision and cadence."""

    train_steps: AtLeast0 = 100
    """Optimizer steps (derived from token_budget when that is set)."""
    token_budget: Optional[Above0] = None
    """Train for this many tokens instead of train_steps (e.g. 3e12)."""
    global_batch_size: Positive = 8
    """Sequences per optimizer step over all DP ranks."""
    micro_batch_size: Positive = 2
    """Sequences per forward pass per DP rank."""
    seq_length: Annotated[int, Field(ge=2)] = 64
    """Tokens per sequence."""
    precision: Precision = "fp32"
    """`bf16`, `fp16` or `fp32`."""
    recompute: Recompute = "none"
    """Activation recomputation: `none`, `selective` (attention core) or `full` (every layer)."""
    seed: int = 1234
    log_interval: Positive = 1
    eval_interval: AtLeast0 = 0
    """Evaluate every N steps (0: never)."""
    eval_steps: Positive = 2
    """Global batches per evaluation."""
    max_consecutive_nonfinite: Positive = 5
    """Stop after this many non-finite losses in a row."""
    exit_after_steps: Optional[int] = None
    """Stop (after a checkpoint) once this step is reached: for tests and time-sliced jobs."""
    progress_bar: bool = False
    """Show a progress bar of the steps on rank 0 (interactive runs; the quickstart)."""
    prefetch: bool = True
    """Build the next batch in a background thread while the step runs (stages whose Trainer holds
    a loader: the embedding stages); false builds it in the step (benchmarks compare the two)."""
    wandb_project: Optional[str] = None
    """Also log to this W&B project when the `wandb` package is installed (TensorBoard always)."""

    @model_validator(mode="after")
    def _whole_micro_batches(self) -> "TrainSection":
        if self.global_batch_size % self.micro_batch_size != 0:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) is not divisible by "
                             f"micro_batch_size ({self.micro_batch_size})")
        return self

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


@config_dataclass("checkpoint")
class CheckpointSection:
    """Where and how often to save; resume is automatic from `<save_dir>/latest`."""

    save_dir: Optional[str] = None
    """Checkpoint directory (default: <run_dir>/checkpoints)."""
    save_interval: AtLeast0 = 0
    """Save every N steps (0: only at the end and on signals)."""
    keep_last: AtLeast0 = 2
    """Checkpoints kept; older ones are deleted after a newer one completes."""
    load_dir: Optional[str] = None
    """Initialise from this checkpoint (e.g. the pretrained model for SFT) when save_dir has none."""
    load_weights_only: bool = True
    """With load_dir: take only the model weights (new optimizer, schedule and data position)."""



@config_dataclass("embedding.dhnm")
class DHNMConfig:
    """Dynamic hard-negative mining in stage 4, the paper's eq. 6 (docs/DESIGN.md section 6): the
    ``embedding.dhnm`` section, and what ``data/dhnm.py``'s ``DHNMState`` applies."""

    enabled: bool = True
    """Replace hard negatives that became easy; off: the first K of each pool stay in use."""
    min_first_score: float = 0.4
    """Replace a negative whose score at first use, S_0, is below this (too easy from the start)."""
    drop_ratio: Above0 = 1.2
    """Replace when `drop_ratio * S_i < S_0` (the negative became much easier) ..."""
    max_score: float = 0.7
    """... and `S_i` is below this."""



@config_dataclass("embedding")
class EmbeddingSection:
    """Contrastive training of the embedder (stages 3 and 4; docs/DESIGN.md sections 5-6)."""

    pooling: Pooling = "mean"
    """How token states become one embedding: `mean`, `last` or `first` (over true lengths)."""
    pool_prompt: bool = False
    """Pool an instructed text's instruction prompt with it. False (default, as GritLM and NV-Embed
    do): the prompt conditions the text through attention but the mean covers the text's own
    tokens; otherwise a 31-token prompt is most of every short query's mean. Exported as
    sentence-transformers' Pooling `include_prompt`."""
    temperature: Above0 = 0.02
    """InfoNCE temperature (logits are cosines / temperature)."""
    symmetric: bool = False
    """Add the passage -> query term (each positive against every gathered query); the loss is then
    the mean of the two directions."""
    mask_duplicate_positives: bool = True
    """Count each text once in every denominator (content keys, losses/infonce.py): an in-batch
    candidate whose text equals a query's own positive is left out of its denominator (a duplicate
    in the global batch is a false negative), and a text that occurs several times among the
    candidates (a hub hard negative, a negative that is another row's positive) counts once."""
    mini_batch_size: AtLeast0 = 0
    """GradCache: embed the local batch in chunks of this many sequences, without activations, then
    replay each chunk with the cached embedding gradient; the batch is then limited by embedding
    memory, not activation memory. 0: one forward per role with activations."""
    mini_batch_tokens: AtLeast0 = 0
    """GradCache: also close a chunk before its texts' true tokens would pass this many (a chunk
    always holds at least one text), so a chunk of long passages costs what a chunk of short
    queries does (sentence-transformers' `mini_batch_num_tokens`). 0: chunks by count only."""
    packing: bool = False
    """Embed each role (and each GradCache chunk) as packed rows: texts back to back into rows of
    `max_tokens_per_row` tokens, attention block-diagonal per text, instead of padding every text to
    the longest. Same embeddings and gradients (tested to 1e-5 in fp32)."""
    max_tokens_per_row: Positive = 512
    """Packed row width in tokens (widened to the longest text of the batch)."""
    drop_last: bool = True
    """Skip the partial last global batch of every task epoch (counted, logged as
    `dropped_tail_examples`): a batch of a few examples has few in-batch negatives, so its loss and
    gradient norm jump (a 5-example tail step spiked the grad norm to 22 against ~6)."""
    max_query_length: Annotated[int, Field(ge=2)] = 128
    """Query tokens (instruction included, EOD included); longer queries are cut."""
    max_passage_length: Annotated[int, Field(ge=2)] = 256
    """Passage tokens (EOD included); longer passages are cut."""
    query_instruction: Optional[str] = None
    """The instruction of retrieval queries at inference, exported as the sentence-transformers
    `query` prompt (training data carries its own instructions)."""
    matryoshka_dims: List[Positive] = field(default_factory=list)
    """Matryoshka truncations summed in the loss (empty: the full width only); dims above the width
    are dropped and the full width is always included."""
    matryoshka_weights: Dict[int, float] = field(default_factory=dict)
    """Per-dim loss weights (a dim not listed weighs 1)."""
    num_negatives: AtLeast0 = 7
    """Hard-negative slots per retrieval / cross-lingual query (stage 4)."""
    task_weights: Dict[str, NonNegative] = field(default_factory=dict)
    """Stage 4: how often each task's batch is drawn (empty: the paper's mix)."""
    task_batch_sizes: Dict[str, Positive] = field(default_factory=dict)
    """Stage 4: per-rank batch size per task (paper: retrieval 4, sts 32); a task not listed uses
    train.global_batch_size / data-parallel size."""
    cosent_scale: Above0 = 20.0
    """CoSENT scale (1 / tau) for the sts task."""
    dhnm: DHNMConfig = field(default_factory=DHNMConfig)
    """Dynamic hard-negative mining of the retrieval and clr tasks (stage 4)."""



@config_dataclass()
class RunConfig:
    """The sections every stage's run has; each stage's config adds its data (and its own sections).
    Written resolved to <run_dir>/config.yaml."""

    run_dir: str = "runs/tiny"
    """Logs, TensorBoard events, the resolved config and (by default) checkpoints."""
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    @model_validator(mode="after")
    def _layout_splits_the_model(self) -> "RunConfig":
        problem = self.parallel.split_problem(self.model.build())
        if problem:
            raise ValueError(problem)
        return self

    def checkpoint_dir(self) -> str:
        return self.checkpoint.save_dir or os.path.join(self.run_dir, "checkpoints")


@config_dataclass()
class LanguageModelConfig(RunConfig):
    """A pretraining or SFT run: the shared sections and blended, SFT or synthetic data."""

    data: LanguageModelData = field(default_factory=SyntheticData)


@config_dataclass()
class EmbeddingConfig(RunConfig):
    """A contrastive run (embed-weak, embed-sup): the shared sections, a contrastive store and the
    embedding section."""

    data: ContrastiveData = field(default_factory=ContrastiveData)
    embedding: EmbeddingSection = field(default_factory=EmbeddingSection)


STAGE_CONFIGS: Dict[str, type] = {"pretrain": LanguageModelConfig, "sft": LanguageModelConfig,
                                  "embed-weak": EmbeddingConfig, "embed-sup": EmbeddingConfig}
"""The config class of each stage id (training/stage_registry.py has the stages themselves)."""


def config_class(stage: str) -> type:
    """The config class of stage id `stage`."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGE_CONFIGS)}")
    return STAGE_CONFIGS[stage]


def load_run_config(stage: str, path: Optional[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Stage `stage`'s config from a YAML recipe (or a run's written config.yaml) plus dotted overrides."""
    return run_config_from_dict(stage, apply_overrides(read_recipe(path), list(overrides)))


def run_config_from_dict(stage: str, values: Dict[str, Any]) -> RunConfig:
    """Stage `stage`'s config from a nested mapping (a written run config included)."""
    return from_dict(config_class(stage), values)
