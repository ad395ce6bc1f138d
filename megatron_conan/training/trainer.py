"""The Trainer every stage runs in: build, ``resume()``, ``step()``, ``fit()``.

``Trainer(cfg, stage)`` builds the run (collective): process groups -> model chunks (our spec, with
the stage's core attention) -> DDP -> megatron optimizer + LR schedule -> the stage's data, and holds
the stage's loader (``Stage.build_loader``), read ahead by a background thread unless
``train.prefetch`` is false (``data/prefetch.py``). Then

    resume()  the run's own ``latest`` checkpoint (everything), else the weights of checkpoint.load_dir
    step()    one optimizer step: the loader's next batch, the stage's forward/backward
              (``Stage.train_step``), the non-finite guard, the update; returns the step's record
    fit()     resume, then step until the last step or a stop request, the callbacks after each step;
              on an error, every callback's ``on_error`` before it propagates

What happens around the step is a callback (``training/callbacks.py``): the metric sinks
(``metrics.jsonl``, TensorBoard / W&B, console, progress bar), in-loop evaluation, preemption and
checkpoint saves. What differs between stages lives in the stage object (``training/stage.py``);
this file never looks at a batch.

SIGTERM / SIGUSR1 (SLURM preemption) trigger a checkpoint at the end of the current step and a clean
exit; a killed run resumes from ``latest`` and reproduces the losses of an uninterrupted run exactly:
model, optimizer, LR schedule, RNG states, the soft-mask schedule, the loader's position (the next
batch the step takes, ``extra["loader"]``) and the stage's own state and files are all in the
checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_conan import stop_signals
from megatron_conan.checkpoint.layout import read_latest
from megatron_conan.checkpoint.load import load_checkpoint
from megatron_conan.checkpoint.save import save_checkpoint
from megatron_conan.config.loader import dump_config, to_dict
from megatron_conan.config.run import STAGE_CONFIGS, OptimizerSection, RunConfig
from megatron_conan.data.prefetch import Prefetcher, StatefulLoader
from megatron_conan.distributed.device import current_placement
from megatron_conan.distributed.parallel import describe_layout, initialize_model_parallel
from megatron_conan.errors import CheckpointMismatchError, ConfigError
from megatron_conan.models.conan import build_model_chunks
from megatron_conan.models.transformer_config import build_transformer_config
from megatron_conan.ops.soft_mask_attention.core_attention import get_soft_mask_state, load_soft_mask_state
from megatron_conan.training.callbacks import Callback, default_callbacks
from megatron_conan.training.dry_run import model_flops_per_token
from megatron_conan.training.hooks import StepRecord
from megatron_conan.training.megatron_step import build_optimizer, optimizer_step, wrap_model, zero_grads
from megatron_conan.training.metrics import NonFiniteGuard, ThroughputMeter, memory_metrics
from megatron_conan.training.stage import Stage, StageContext
from megatron_conan.training.stage_registry import build_stage

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished (or preempted) run reports."""

    steps_done: int
    losses: Dict[int, float]
    preempted: bool
    skipped_steps: int


class Trainer:
    """One run of a stage: its model, optimizer, LR schedule and data, and the loop over its steps."""

    def __init__(self, cfg: RunConfig, stage: Stage, callbacks: Optional[Sequence[Callback]] = None):
        """Build the run (collective); `callbacks` replace :func:`default_callbacks` of `cfg`."""
        self.cfg, self.stage = cfg, stage
        self.ctx, self.optimizer, self.scheduler = _build(cfg, stage)
        loader = stage.build_loader(self.ctx)
        self.loader: Optional[StatefulLoader] = Prefetcher(loader) if loader is not None and cfg.train.prefetch else loader
        """The stage's batches (None: the stage reads its own data); its position is checkpointed."""
        self.callbacks: List[Callback] = list(default_callbacks(cfg) if callbacks is None else callbacks)
        self.guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite)
        self.meter = ThroughputMeter(model_flops_per_token(self.ctx.model_config, cfg.train.seq_length),
                                     dist.get_world_size())
        self.step_count = 0
        """Optimizer steps done (skipped ones included)."""
        self.consumed_samples = 0
        self.losses: Dict[int, float] = {}
        self.last_steps = min(self.ctx.total_steps, cfg.train.exit_after_steps or self.ctx.total_steps)
        """The step this run stops after (``train.exit_after_steps`` ends it early)."""
        self.preempted = False
        """Set by a callback to stop after the current step (SIGTERM / SIGUSR1)."""

    def resume(self) -> None:
        """Restore the run's own ``latest`` checkpoint (everything, the stage's state included), else
        the weights of ``checkpoint.load_dir``; a fresh run starts at step 0."""
        ctx, cfg = self.ctx, self.cfg
        latest = read_latest(cfg.checkpoint_dir())
        if latest is None:
            if cfg.checkpoint.load_dir:
                source = read_latest(cfg.checkpoint.load_dir) or cfg.checkpoint.load_dir
                load_checkpoint(source, ctx.chunks, self.optimizer, self.scheduler, ctx.model_config,
                                weights_only=cfg.checkpoint.load_weights_only)
                logger.info("initialised weights from %s", source)
            return
        common = load_checkpoint(latest, ctx.chunks, self.optimizer, self.scheduler, ctx.model_config)
        self.step_count, self.consumed_samples = common["step"], common["consumed_samples"]
        extra = common.get("extra", {})
        # checkpoints written before the stage seam kept only the LM data position
        self.stage.load_state_dict(extra.get("stage", {"consumed_samples": self.consumed_samples}))
        self._load_loader_state(latest, extra.get("loader"))
        self.stage.read_checkpoint_files(latest)
        if "nonfinite" in extra:
            self.guard.load_state_dict(extra["nonfinite"])
        if extra.get("soft_mask") is not None:
            load_soft_mask_state(ctx.chunks, extra["soft_mask"])  # refuses a changed schedule
        logger.info("resumed from %s at step %d (%d samples consumed)", latest, self.step_count, self.consumed_samples)

    def _load_loader_state(self, checkpoint: str, state: Optional[Dict[str, object]]) -> None:
        if self.loader is None:
            return
        if state is None:
            raise CheckpointMismatchError(
                f"{checkpoint} has no data-loader position (written by another stage, or before the Trainer "
                f"held the loader): start the {self.stage.name} stage from it with checkpoint.load_dir, in a "
                f"new run_dir")
        self.loader.load_state_dict(state)

    def save(self) -> None:
        """Checkpoint the run at the current step (collective): what :meth:`resume` restores. Stop
        signals are held during it (:func:`stop_signals.held`: the writer's helper processes must
        not die of them)."""
        ctx = self.ctx
        with stop_signals.held():
            save_checkpoint(self.cfg.checkpoint_dir(), self.step_count, ctx.chunks, self.optimizer, self.scheduler,
                            ctx.model_config, self.consumed_samples,
                            extra_state={"nonfinite": self.guard.state_dict(),
                                         "soft_mask": get_soft_mask_state(ctx.chunks),
                                         "stage": self.stage.state_dict(),
                                         "loader": None if self.loader is None else self.loader.state_dict(),
                                         "stage_name": self.stage.name,
                                         "run_config": to_dict(self.cfg)},
                            keep_last=self.cfg.checkpoint.keep_last,
                            write_extra_files=self.stage.write_checkpoint_files)

    def step(self) -> StepRecord:
        """One optimizer step over the stage's next global batch (collective)."""
        started = time.perf_counter()
        zero_grads(self.ctx.chunks, self.optimizer)
        batch = None if self.loader is None else next(self.loader)
        output = self.stage.train_step(self.ctx, self.step_count, batch)
        self.step_count += 1
        step = self.step_count
        skipped = self.guard.update(output.loss, step)  # raises after too many in a row: no checkpoint then
        self.consumed_samples += output.samples
        applied_lr = self.optimizer.param_groups[0]["lr"]  # what this update uses
        grad_norm = None
        if skipped:
            self.optimizer.zero_grad()  # non-finite loss: non-finite gradients somewhere, no update
        else:
            update_successful, grad_norm = optimizer_step(self.optimizer)
            if update_successful:
                self.scheduler.step(increment=1)  # the schedule counts optimizer steps
        elapsed = time.perf_counter() - started
        self.losses[step] = output.loss
        throughput = self.meter.update(output.tokens, elapsed)
        record = {"step": step, "loss": output.loss, "lr": applied_lr,
                  "grad_norm": grad_norm, "skipped_steps": self.guard.total_skipped,
                  "consumed_samples": self.consumed_samples, "samples_per_s": output.samples / elapsed,
                  "tokens_per_s": throughput.tokens_per_second,
                  "model_tflops_per_gpu": throughput.model_tflops_per_gpu, "mfu": throughput.mfu,
                  **memory_metrics(), **output.metrics}
        return StepRecord(step=step, loss=output.loss, skipped=skipped, grad_norm=grad_norm, record=record)

    def fit(self) -> RunResult:
        """Resume, then step until the run's last step or a stop request (collective)."""
        try:
            self.resume()
            for callback in self.callbacks:
                callback.on_fit_start(self)
            while self.step_count < self.last_steps and not self.preempted:
                record = self.step()
                for callback in self.callbacks:
                    callback.on_step_end(self, record)
            for callback in self.callbacks:
                callback.on_fit_end(self)
        except BaseException as error:
            self._report_error(error)
            raise
        finally:
            for callback in self.callbacks:
                callback.close()
            if isinstance(self.loader, Prefetcher):
                self.loader.close()  # its thread stops (a failed step leaves no reader behind)
            self.stage.close()
        return RunResult(steps_done=self.step_count, losses=self.losses, preempted=self.preempted,
                         skipped_steps=self.guard.total_skipped)

    def _report_error(self, error: BaseException) -> None:
        """Every callback's ``on_error``; one that fails is logged, so that it neither hides `error`
        nor keeps the callbacks after it from theirs."""
        for callback in self.callbacks:
            try:
                callback.on_error(self, error)
            except Exception:
                logger.exception("%s.on_error failed while the run failed with %r", type(callback).__name__, error)


def _build(cfg: RunConfig, stage: Stage):
    """Process groups, the model with the stage's attention, DDP, optimizer, LR schedule and the
    stage's data: (StageContext, optimizer, scheduler). Collective."""
    expected = STAGE_CONFIGS.get(stage.name)
    if expected is not None and not isinstance(cfg, expected):
        raise ConfigError(f"the {stage.name} stage takes its config as {expected.__name__}, not {type(cfg).__name__}")
    stage.check_config(cfg)
    if cfg.train.eval_interval and not stage.evaluates:
        raise ConfigError(f"train.eval_interval: the {stage.name} stage has no in-loop evaluation "
                          "(evaluate its checkpoints with conan-eval); set train.eval_interval=0")
    model_config = cfg.model.build()
    stage.check_inputs(cfg, model_config)
    data_parallel = initialize_model_parallel(cfg.parallel, seed=cfg.train.seed)
    transformer_config = build_transformer_config(
        model_config, cfg.parallel, precision=cfg.train.precision,
        transformer_overrides=_transformer_overrides(cfg, stage),
    )
    total_steps = cfg.train.steps()
    if dist.get_rank() == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    logger.info("%s", describe_layout())
    chunks = wrap_model(build_model_chunks(model_config, transformer_config, core_attention=stage.core_attention(cfg),
                                           use_transformer_engine=cfg.model.transformer_engine),
                        transformer_config,
                        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    optimizer = build_optimizer(chunks, transformer_config, cfg.optimizer,
                                use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)
    ctx = StageContext(cfg=cfg, model_config=model_config, transformer_config=transformer_config, chunks=chunks,
                       placement=current_placement(),
                       data_parallel_rank=parallel_state.get_data_parallel_rank(),
                       data_parallel_size=data_parallel,
                       data_parallel_group=parallel_state.get_data_parallel_group(),
                       total_steps=total_steps)
    stage.setup(ctx)
    return ctx, optimizer, scheduler


def _transformer_overrides(cfg: RunConfig, stage: Stage) -> Dict:
    overrides = dict(stage.transformer_overrides())
    overrides.update(cfg.model.transformer_overrides)
    if cfg.train.recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif cfg.train.recompute == "selective":
        overrides.update(recompute_granularity="selective")
    return overrides


def build_scheduler(optimizer, section: OptimizerSection, total_steps: int) -> OptimizerParamScheduler:
    """The LR schedule of the run's optimizer section, holding the lr of the *next* update.

    megatron-core's scheduler gives ``lr(n)`` after ``n`` calls to ``step``, and ``lr(0)`` is the
    warm-up's ``init_lr`` (0): stepped only after each update, the first update of every run would
    apply lr 0 and waste a step. So the schedule is advanced once here, and update k (1-based) runs
    at ``lr(k)``: linear warm-up ``k / warmup * lr`` to the peak, then the decay, reaching ``min_lr`` at
    update ``total_steps``. A checkpoint stores ``num_steps = updates + 1``; resuming restores it.
    """
    warmup = int(round(section.warmup_fraction * total_steps))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=section.lr, min_lr=section.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=section.decay_style,
        start_wd=section.weight_decay, end_wd=section.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )
    scheduler.step(increment=1)
    return scheduler


def train(cfg: RunConfig, stage: Union[str, Stage] = "pretrain") -> RunResult:
    """Run (or resume) a run of `stage` (a Stage or a stage id) with the default callbacks; collective
    over the torch.distributed world."""
    return Trainer(cfg, build_stage(stage) if isinstance(stage, str) else stage).fit()
