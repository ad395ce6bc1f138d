"""The embedding stages (3 embed-weak, 4 embed-sup) as plug-ins of the shared loop.

Both train the decoder as an embedder (``models/embedder.py``: no output layer, pooled, L2-normalised)
on batches of a contrastive store (``data/contrastive.py``), one task per batch; the step's loss is
composed from the task table and the config (``training/embedding_loss.py``: the task's loss, e.g.
InfoNCE over candidates gathered across the data-parallel group, the Matryoshka wrapper, and
GradCache or the plain step, ``training/contrastive_step.py``).

Stage 3 (weakly supervised, ``pair`` data): attention moves from causal to bidirectional with the soft
mask; a(t) follows the step (``model.soft_mask``; its ``total_steps`` defaults to the stage's steps
minus one, so the first step is causal and the last one bidirectional),
is logged every step as ``soft_mask_a`` and is checkpointed with the model. Stage 4 (supervised,
multi-task with hard negatives) builds on the same pieces; it attends bidirectionally unless
``model.soft_mask`` says otherwise.

Parallelism: TP (every TP rank computes the same embeddings), SP, DP (the contrastive batch is the
global batch: candidates are gathered over DP). Pipeline parallelism is refused: the loss couples the
whole batch, which a pipeline schedule's independent per-micro-batch losses cannot express, and a
1.5B model fits one GPU (GradCache bounds activation memory instead).
"""

from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional

import torch
from megatron.core.distributed import finalize_model_grads

from megatron_conan.data.contrastive import BatchBuilder, ContrastiveBatch, ContrastiveLoader
from megatron_conan.data.dhnm import DHNMState
from megatron_conan.data.provenance import check_tokenizer
from megatron_conan.errors import ConfigError
from megatron_conan.losses.gather import GroupGather
from megatron_conan.losses.targets import LossTargets
from megatron_conan.ops.soft_mask_attention.core_attention import (
    set_soft_mask_step,
    soft_mask_a,
    soft_mask_core_attention_spec,
)
from megatron_conan.ops.soft_mask_attention.schedule import SoftMaskConfig
from megatron_conan.tasks import BY_NAME, NEGATIVES_MINED, Task, stage_tasks
from megatron_conan.training.contrastive_step import RoleEmbedder, Sequences
from megatron_conan.training.embedding_loss import compose_loss, loss_keys
from megatron_conan.training.preflight import load_checked_tokenizer
from megatron_conan.training.stage import BatchPlan, Stage, StageContext, StageStepOutput

logger = logging.getLogger(__name__)


class EmbeddingStage(Stage):
    """What stages 3 and 4 share: config checks, soft-mask attention, the loader, the step."""

    name = "embedding"
    default_soft_mask: Dict[str, object] = {}
    tasks: Optional[tuple] = None

    def __init__(self):
        self.tokenizer = None
        self.builder: Optional[BatchBuilder] = None
        """The loader's batch builder: the step fills pending hard negatives with it."""
        self._loader: Optional[ContrastiveLoader] = None
        """Built by setup, until build_loader hands it to the Trainer."""

    # -- configuration --
    def check_config(self, cfg) -> None:
        if cfg.parallel.pipeline_parallel > 1:
            raise ConfigError(
                f"parallel.pipeline_parallel={cfg.parallel.pipeline_parallel}: the {self.name} stage does not "
                "support pipeline parallelism (the contrastive loss couples the whole batch); use tensor and "
                "data parallelism, and embedding.mini_batch_size (GradCache) to bound activation memory")
        if not cfg.data.contrastive_prefix:
            raise ConfigError("data.contrastive_prefix is required for data.kind=contrastive")
        self.soft_mask_config(cfg)

    def check_inputs(self, cfg, model_config) -> None:
        self.tokenizer = load_checked_tokenizer(cfg, model_config)
        check_tokenizer(cfg.data.contrastive_prefix, self.tokenizer)

    def soft_mask_config(self, cfg) -> SoftMaskConfig:
        values = {**self.default_soft_mask, **(cfg.model.soft_mask or {})}
        if values.get("fixed_a") is None and values.get("total_steps") is None:
            # steps t = 0 .. T-1 of the stage: a(0) = 0 (causal) at the first, a = 1 (bidirectional)
            # at the last, so the checkpoint the stage ends with is the bidirectional model
            values["total_steps"] = max(cfg.train.steps() - 1, 1)
        try:
            return SoftMaskConfig(**values)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.soft_mask: {error}") from None

    def core_attention(self, cfg):
        # embedding needs key-padding masks, which only the soft-mask attention takes with any a
        return soft_mask_core_attention_spec(self.soft_mask_config(cfg))

    def transformer_overrides(self) -> Dict[str, object]:
        # a mean over anchors; DDP averages over DP ranks (losses/gather.py states the contract)
        return {"calculate_per_token_loss": False}

    def describe_batch(self, cfg, world_size: int) -> BatchPlan:
        # one contrastive batch per step: no micro-batches; GradCache chunks bound the activations
        data_parallel = cfg.parallel.data_parallel(world_size)
        per_rank = cfg.train.global_batch_size // data_parallel
        chunk = cfg.embedding.mini_batch_size
        text = (f"contrastive batch: {self.describe_examples(cfg, per_rank, data_parallel)}"
                + (f"GradCache chunks of {chunk} sequences" if chunk
                   else "no GradCache (activations of the whole per-rank batch)")
                + f"; queries <= {cfg.embedding.max_query_length}, passages <= "
                f"{cfg.embedding.max_passage_length} tokens")
        return BatchPlan(micro_batch_size=chunk if chunk and per_rank % chunk == 0 else per_rank, description=text)

    def describe_examples(self, cfg, per_rank: int, data_parallel: int) -> str:
        """What one step's examples are, for :meth:`describe_batch`."""
        return (f"{cfg.train.global_batch_size} queries ({per_rank} per DP rank), each scored against "
                f"{cfg.train.global_batch_size} gathered positives; ")

    # -- data --
    def per_rank_batch_size(self, ctx: StageContext) -> int:
        global_batch = ctx.cfg.train.global_batch_size
        if global_batch % ctx.data_parallel_size:
            raise ConfigError(f"train.global_batch_size ({global_batch}) is not divisible by the data-parallel "
                              f"size ({ctx.data_parallel_size})")
        return global_batch // ctx.data_parallel_size

    def loader_batch_size(self, ctx: StageContext):
        return self.per_rank_batch_size(ctx)

    def setup(self, ctx: StageContext) -> None:
        """The run's contrastive loader, for :meth:`build_loader` (a harness that feeds the step its
        own batches overrides this: then the Trainer holds no loader)."""
        self._loader = self.make_loader(ctx)

    def build_loader(self, ctx: StageContext) -> Optional[ContrastiveLoader]:
        """The loader :meth:`setup` built, handed to the Trainer, which holds it (and reads it ahead)."""
        loader, self._loader = self._loader, None
        return loader

    def make_loader(self, ctx: StageContext) -> ContrastiveLoader:
        cfg, embedding = ctx.cfg, ctx.cfg.embedding
        loader = ContrastiveLoader(
            cfg.data.contrastive_prefix, self.tokenizer, self.loader_batch_size(ctx),
            dp_rank=ctx.data_parallel_rank, dp_world_size=ctx.data_parallel_size, seed=cfg.train.seed,
            max_query_length=embedding.max_query_length, max_passage_length=embedding.max_passage_length,
            num_negatives=embedding.num_negatives, tasks=self.tasks, drop_last=embedding.drop_last,
            **self.loader_options(ctx))
        for task in loader.tasks:
            size = loader.batch_sizes[task] * ctx.data_parallel_size
            tail = len(loader.store.example_ids_of_task(task)) % size
            if tail:
                logger.info("%s: %s epochs end in a partial global batch of %d of %d examples: %s",
                            self.name, task, tail, size, "skipped (embedding.drop_last)" if embedding.drop_last
                            else "trained as a small batch")
        self.builder = loader.builder
        return loader

    def loader_options(self, ctx: StageContext) -> Dict[str, object]:
        """Further ContrastiveLoader arguments of this stage."""
        return {}

    def state_dict(self) -> Dict[str, object]:
        """Nothing: the data position is the loader's (the Trainer saves it), DHNM's state is files."""
        return {}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        pass

    # -- the step --
    def train_step(self, ctx: StageContext, step: int, batch: Optional[ContrastiveBatch] = None) -> StageStepOutput:
        if batch.negatives_pending:
            self.fill_negatives(batch)
        return self.step_on_batch(ctx, step, batch)

    def fill_negatives(self, batch: ContrastiveBatch) -> None:
        """The hard-negative slots of a batch the loader left them to (the first K of each pool)."""
        self.builder.add_negatives(batch)

    def step_on_batch(self, ctx: StageContext, step: int, batch) -> StageStepOutput:
        """Forward, loss and backward of one (CPU) ContrastiveBatch of this rank (every rank: the
        same task); tests feed batches here."""
        set_soft_mask_step(ctx.chunks, step)  # a(t) of this step
        task = BY_NAME[batch.task]
        keys = loss_keys(task, batch, ctx.cfg.embedding)  # hashed on the CPU
        batch, keys = ctx.placement.to_device((batch, keys))
        roles = self.roles(ctx, batch)
        targets = LossTargets(negative_mask=batch.negative_mask, scores=batch.scores, **keys)
        loss = compose_loss(task, ctx.cfg.embedding, GroupGather(ctx.data_parallel_group))
        loss_value, stats = self.run_contrastive(ctx, roles, loss, targets)
        finalize_model_grads(ctx.chunks)  # DP all-reduce (DDP averages), SP norms over TP
        tokens = sum(int(sequences.lengths.sum()) for sequences in roles.values())
        reduced = self.reduce_step_stats(ctx, loss_value, stats, batch.size, tokens)
        reduced["dropped_tail_examples"] = batch.dropped_examples
        global_loss, samples, tokens = reduced.pop("loss"), reduced.pop("samples"), reduced.pop("tokens")
        return StageStepOutput(loss=global_loss, samples=samples, tokens=tokens,
                               metrics=self.step_metrics(ctx, task, batch, global_loss, reduced, stats))

    def step_metrics(self, ctx: StageContext, task: Task, batch, loss: float, reduced: Dict[str, object],
                     stats: Dict[str, torch.Tensor]) -> Dict[str, object]:
        """The step's metrics beyond its loss, samples and tokens (`reduced`: the other global numbers)."""
        return reduced

    def reduce_step_stats(self, ctx: StageContext, loss: torch.Tensor, stats: Dict[str, torch.Tensor],
                          samples: int, tokens: int) -> Dict[str, float]:
        """Global numbers: the loss (mean of the ranks' losses = the global mean), anchor-weighted
        means of accuracy and cosines, summed samples and tokens."""
        anchors = float(stats.get("num_anchors", torch.tensor(samples)))
        names = [name for name in ("accuracy", "positive_cosine", "negative_cosine", "hard_negative_cosine")
                 if name in stats]
        # per-dim Matryoshka losses are, like the loss, each rank's share of the global mean
        dim_losses = sorted(name for name in stats if name.startswith("loss_dim_"))
        values = ctx.placement.tensor([float(loss), samples, tokens, anchors]
                                      + [float(stats[name]) * anchors for name in names]
                                      + [float(stats[name]) for name in dim_losses], dtype=torch.float64)
        ctx.placement.all_reduce(values, group=ctx.data_parallel_group)
        total_anchors = max(float(values[3]), 1.0)
        reduced = {"loss": float(values[0]) / ctx.data_parallel_size, "samples": int(values[1]),
                   "tokens": int(values[2])}
        reduced.update({name: float(values[4 + i]) / total_anchors for i, name in enumerate(names)})
        first_dim = 4 + len(names)
        reduced.update({name: float(values[first_dim + i]) / ctx.data_parallel_size
                        for i, name in enumerate(dim_losses)})
        return reduced

    @staticmethod
    def roles(ctx: StageContext, batch) -> Dict[str, Sequences]:
        """The batch's queries and positives, with their instruction prompts left out of the pooling
        unless `embedding.pool_prompt`, and its hard negatives (K per query) if it has them."""
        def starts(lengths):
            return None if ctx.cfg.embedding.pool_prompt else lengths
        roles = {"queries": Sequences(batch.query_ids, batch.query_lengths, starts(batch.query_prompt_lengths)),
                 "positives": Sequences(batch.positive_ids, batch.positive_lengths,
                                        starts(batch.positive_prompt_lengths))}
        if batch.negative_ids is not None:
            roles["hard_negatives"] = Sequences(batch.negative_ids, batch.negative_lengths,
                                                per_example=batch.negative_mask.shape[1])
        return roles

    def run_contrastive(self, ctx: StageContext, roles: Dict[str, Sequences], loss, targets: LossTargets):
        """`loss` (FullBatch or GradCache) over `roles`: forward, loss and backward."""
        section = ctx.cfg.embedding
        embedder = RoleEmbedder(ctx.chunks[0], section.pooling, ctx.model_config.hidden_size,
                                max_tokens_per_row=section.max_tokens_per_row if section.packing else 0)
        return loss.forward_backward(embedder, roles, targets, grad_scale=ctx.transformer_config.grad_scale_func)


class WeaklySupervisedStage(EmbeddingStage):
    """Stage 3: (query, positive) pairs, in-batch negatives gathered over DP, the soft mask moving."""

    name = "embed-weak"
    tasks = stage_tasks(3)

    def step_metrics(self, ctx: StageContext, task: Task, batch, loss: float, reduced: Dict[str, object],
                     stats: Dict[str, torch.Tensor]) -> Dict[str, object]:
        return {"soft_mask_a": soft_mask_a(ctx.chunks), **reduced}


class SupervisedStage(EmbeddingStage):
    """Stage 4: multi-task batches (one task per step, drawn by `embedding.task_weights`).

    retrieval / clr   InfoNCE over the gathered positives and hard negatives (K slots per query,
                      missing ones masked), the slots chosen by DHNM, whose state is observed with
                      the cosines the loss computed at full width
    classification    InfoNCE of a text against its own label texts only (no in-batch negatives)
    sts               CoSENT over the rank's own pairs (DDP averages the ranks' gradients)

    Every task's loss is summed over the Matryoshka dims (`embedding.matryoshka_dims`).
    """

    name = "embed-sup"
    default_soft_mask = {"fixed_a": 1.0}  # bidirectional unless model.soft_mask says otherwise
    tasks = stage_tasks(4)

    def __init__(self):
        super().__init__()
        self.dhnm = None

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        for what, mapping in (("task_weights", cfg.embedding.task_weights),
                              ("task_batch_sizes", cfg.embedding.task_batch_sizes)):
            unknown = sorted(set(mapping) - set(self.tasks))
            if unknown:
                hint = "".join(f" ({name} is stage {BY_NAME[name].stage}'s task)" for name in unknown if name in BY_NAME)
                raise ConfigError(f"embedding.{what}: unknown task(s) {unknown}{hint}; the stage-4 tasks are "
                                  f"{list(self.tasks)}")

    def describe_examples(self, cfg, per_rank: int, data_parallel: int) -> str:
        sizes = {task: cfg.embedding.task_batch_sizes.get(task, per_rank) for task in self.tasks}
        return ("one task per step, per DP rank: " + ", ".join(f"{t} {n}" for t, n in sizes.items())
                + f" (retrieval/clr queries with {cfg.embedding.num_negatives} hard negatives each, "
                f"gathered over {data_parallel} DP ranks); ")

    def loader_batch_size(self, ctx: StageContext):
        default = self.per_rank_batch_size(ctx)
        return {task: int(ctx.cfg.embedding.task_batch_sizes.get(task, default)) for task in self.tasks}

    def loader_options(self, ctx: StageContext) -> Dict[str, object]:
        return {"task_weights": dict(ctx.cfg.embedding.task_weights) or None}

    def make_loader(self, ctx: StageContext) -> ContrastiveLoader:
        loader = super().make_loader(ctx)
        embedding = ctx.cfg.embedding
        if embedding.dhnm.enabled and embedding.num_negatives > 0:
            self.dhnm = DHNMState(loader.store.pool_sizes(), embedding.num_negatives, embedding.dhnm,
                                  dp_rank=ctx.data_parallel_rank, dp_size=ctx.data_parallel_size,
                                  group=ctx.data_parallel_group, placement=ctx.placement)
            loader.defer_mined_negatives = True  # the step exchanges, then fills them
        return loader

    def fill_negatives(self, batch: ContrastiveBatch) -> None:
        """DHNM's slots: the positions of the whole global batch from their owner ranks (the
        exchange, a collective every rank makes with the same global batch, after the previous
        step's observe), then this rank's slice filled with them."""
        if self.dhnm is None:
            super().fill_negatives(batch)
            return
        self.dhnm.exchange(batch.global_example_ids)
        self.builder.add_negatives(batch, self.dhnm)

    # -- state: the DHNM shards as checkpoint files (the loader's position is the Trainer's) --
    def write_checkpoint_files(self, directory: str) -> None:
        if self.dhnm is not None:
            from megatron.core import parallel_state

            # one copy per DP index: TP and PP ranks > 0 hold the same shard
            writer = (parallel_state.get_tensor_model_parallel_rank() == 0
                      and parallel_state.get_pipeline_model_parallel_rank() == 0)
            self.dhnm.save(directory, writer=writer)

    def read_checkpoint_files(self, directory: str) -> None:
        if self.dhnm is not None:
            self.dhnm.load(directory)

    # -- the step's metrics, and DHNM's observation of the cosines the loss computed --
    def step_metrics(self, ctx: StageContext, task: Task, batch, loss: float, reduced: Dict[str, object],
                     stats: Dict[str, torch.Tensor]) -> Dict[str, object]:
        metrics = {"task": task.name, f"loss_{task.name}": loss, **reduced}
        if self.dhnm is not None and task.negatives == NEGATIVES_MINED:
            observed = self.dhnm.observe(batch.example_ids, batch.negative_pool_positions,
                                         stats["hard_negative_cosines"], batch.negative_mask)
            metrics.update(observed.metrics())
        return metrics
