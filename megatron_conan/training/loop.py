"""The training loop shared by every stage.

One call, :func:`train`, runs a whole (possibly resumed) run: process groups -> model chunks (our
spec, with the stage's core attention) -> DDP -> megatron optimizer + LR schedule -> the stage's data
-> for each step: the stage's forward/backward (``Stage.train_step``), the non-finite guard, the
optimizer update, logging, periodic evaluation and checkpoints. What differs between stages lives in
the stage object (``training/stage.py``); this file never looks at a batch.

SIGTERM / SIGUSR1 (SLURM preemption) trigger a checkpoint at the end of the current step and a clean
exit; a killed run resumes from ``latest`` and reproduces the losses of an uninterrupted run exactly:
model, optimizer, LR schedule, RNG states, the soft-mask schedule and the stage's own state (its data
position and anything else it keeps) are all in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_conan.checkpoint.layout import read_latest
from megatron_conan.checkpoint.load import load_checkpoint
from megatron_conan.checkpoint.save import save_checkpoint
from megatron_conan.config.loader import dump_config, to_dict
from megatron_conan.config.model import build_transformer_config
from megatron_conan.distributed.device import current_placement
from megatron_conan.distributed.parallel import describe_layout, initialize_model_parallel
from megatron_conan.models.conan import build_model_chunks
from megatron_conan.ops.soft_mask_attention.core_attention import get_soft_mask_state, load_soft_mask_state
from megatron_conan.training.config import RunConfig
from megatron_conan.training.stage import Stage, StageContext
from megatron_conan.training.megatron_step import build_optimizer, optimizer_step, wrap_model, zero_grads

logger = logging.getLogger(__name__)


def build_stage(name: str, forward_step_func: Optional[Callable] = None) -> Stage:
    """The stage plug-in called `name` (the entry points' names)."""
    if name in ("pretrain", "sft"):
        from megatron_conan.training.lm_stage import LanguageModelStage

        return LanguageModelStage(name, forward_step_func)
    if forward_step_func is not None:
        raise ValueError(f"the {name} stage takes no forward_step_func")
    if name == "embed-weak":
        from megatron_conan.training.embedding_stage import WeaklySupervisedStage

        return WeaklySupervisedStage()
    if name == "embed-sup":
        from megatron_conan.training.embedding_stage import SupervisedStage

        return SupervisedStage()
    raise ValueError(f"unknown stage {name!r}; known: pretrain, sft, embed-weak, embed-sup")


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; ranks agree on it with an all-reduce once per step."""

    def __init__(self):
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def any_rank_received(self) -> bool:
        placement = current_placement()
        flag = placement.tensor([1.0 if self.received is not None else 0.0])
        placement.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _transformer_overrides(cfg: RunConfig, stage: Stage) -> Dict:
    overrides = dict(stage.transformer_overrides())
    overrides.update(cfg.model.transformer_overrides)
    if cfg.train.recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif cfg.train.recompute == "selective":
        overrides.update(recompute_granularity="selective")
    return overrides


def build_scheduler(optimizer, cfg: RunConfig, total_steps: int) -> OptimizerParamScheduler:
    """The LR schedule, holding the lr of the *next* update.

    megatron-core's scheduler gives ``lr(n)`` after ``n`` calls to ``step``, and ``lr(0)`` is the
    warm-up's ``init_lr`` (0): stepped only after each update, the first update of every run would
    apply lr 0 and waste a step. So the schedule is advanced once here, and update k (1-based) runs
    at ``lr(k)``: linear warm-up ``k / warmup * lr`` to the peak, then the decay, reaching ``min_lr`` at
    update ``total_steps``. A checkpoint stores ``num_steps = updates + 1``; resuming restores it.
    """
    warmup = int(round(cfg.optimizer.warmup_fraction * total_steps))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=cfg.optimizer.decay_style,
        start_wd=cfg.optimizer.weight_decay, end_wd=cfg.optimizer.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )
    scheduler.step(increment=1)
    return scheduler


@dataclass
class RunResult:
    """What a finished (or preempted) run reports."""

    steps_done: int
    losses: Dict[int, float]
    preempted: bool
    skipped_steps: int


@dataclass
class Trainer:
    """What :func:`build_trainer` assembles: the stage's context, optimizer and LR schedule."""

    ctx: StageContext
    optimizer: object
    scheduler: OptimizerParamScheduler


def build_trainer(cfg: RunConfig, stage: Stage) -> Trainer:
    """Process groups, the model with the stage's attention, DDP, optimizer, LR schedule and the
    stage's data; collective. (The loop's set-up, also what tests and benchmarks of a stage use.)"""
    stage.check_config(cfg)
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
    optimizer = build_optimizer(
        chunks, transformer_config, lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr, weight_decay=cfg.optimizer.weight_decay,
        clip_grad=cfg.optimizer.clip_grad, adam_beta1=cfg.optimizer.adam_beta1,
        adam_beta2=cfg.optimizer.adam_beta2, adam_eps=cfg.optimizer.adam_eps,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    ctx = StageContext(cfg=cfg, model_config=model_config, transformer_config=transformer_config, chunks=chunks,
                       placement=current_placement(),
                       data_parallel_rank=parallel_state.get_data_parallel_rank(),
                       data_parallel_size=data_parallel,
                       data_parallel_group=parallel_state.get_data_parallel_group(),
                       total_steps=total_steps)
    if cfg.train.eval_interval and not stage.supports_evaluation():
        from megatron_conan.errors import ConfigError

        raise ConfigError(f"train.eval_interval: the {stage.name} stage has no in-loop evaluation "
                          "(evaluate its checkpoints with conan-eval); set train.eval_interval=0")
    stage.setup(ctx)
    return Trainer(ctx, optimizer, scheduler)


def _resume(cfg: RunConfig, trainer: Trainer, stage: Stage) -> Dict:
    """Restore the run's own `latest` checkpoint (everything, the stage's state included), else the
    weights of ``checkpoint.load_dir``; returns the restored common state (empty for a fresh run)."""
    chunks, model_config = trainer.ctx.chunks, trainer.ctx.model_config
    latest = read_latest(cfg.checkpoint_dir())
    if latest is not None:
        common = load_checkpoint(latest, chunks, trainer.optimizer, trainer.scheduler, model_config)
        step, consumed = common["step"], common["consumed_samples"]
        extra = common.get("extra", {})
        # checkpoints written before the stage seam kept only the LM data position
        stage.load_state_dict(extra.get("stage", {"consumed_samples": consumed}))
        stage.read_checkpoint_files(latest)
        logger.info("resumed from %s at step %d (%d samples consumed)", latest, step, consumed)
        return common
    if cfg.checkpoint.load_dir:
        source = read_latest(cfg.checkpoint.load_dir) or cfg.checkpoint.load_dir
        load_checkpoint(source, chunks, trainer.optimizer, trainer.scheduler, model_config,
                        weights_only=cfg.checkpoint.load_weights_only)
        logger.info("initialised weights from %s", source)
    return {}


def train(cfg: RunConfig, forward_step_func: Optional[Callable] = None,
          stage: Union[str, Stage] = "pretrain") -> RunResult:
    """Run (or resume) a training run of `stage`; collective over the torch.distributed world.

    `stage` is a Stage object or a stage name; `forward_step_func` replaces the language-model
    stages' forward step (tests inject failures through it).
    """
    if isinstance(stage, str):
        stage = build_stage(stage, forward_step_func)
    trainer = build_trainer(cfg, stage)
    ctx, optimizer, scheduler = trainer.ctx, trainer.optimizer, trainer.scheduler
    chunks, model_config, total_steps = ctx.chunks, ctx.model_config, ctx.total_steps
    rank = dist.get_rank()
    save_dir = cfg.checkpoint_dir()

    common = _resume(cfg, trainer, stage)
    step, consumed = common.get("step", 0), common.get("consumed_samples", 0)

    from megatron_conan.training.dry_run import model_flops_per_token
    from megatron_conan.training.metrics import NonFiniteGuard, ThroughputMeter, TrainingLogger, memory_metrics

    metrics = TrainingLogger(os.path.join(cfg.run_dir, "tensorboard"),
                             use_wandb=cfg.train.wandb_project is not None, wandb_project=cfg.train.wandb_project,
                             run_config=to_dict(cfg))
    meter = ThroughputMeter(model_flops_per_token(model_config, cfg.train.seq_length), dist.get_world_size())
    guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite)
    extra = common.get("extra", {})
    if "nonfinite" in extra:
        guard.load_state_dict(extra["nonfinite"])
    if extra.get("soft_mask") is not None:
        load_soft_mask_state(chunks, extra["soft_mask"])  # refuses a changed schedule
    losses: Dict[int, float] = {}
    preemption = PreemptionFlag()
    metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    stop_at = min(total_steps, cfg.train.exit_after_steps or total_steps)
    preempted = False

    def save():
        save_checkpoint(save_dir, step, chunks, optimizer, scheduler, model_config, consumed,
                        extra_state={"nonfinite": guard.state_dict(),
                                     "soft_mask": get_soft_mask_state(chunks),
                                     "stage": stage.state_dict(),
                                     "stage_name": stage.name,
                                     "run_config": to_dict(cfg)},
                        keep_last=cfg.checkpoint.keep_last,
                        **_stage_file_hook(stage))

    progress = None
    if cfg.train.progress_bar and rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=stop_at, initial=step, desc=stage.name, unit="step", leave=False, dynamic_ncols=True)
    try:
        while step < stop_at:
            started = time.perf_counter()
            zero_grads(chunks, optimizer)
            output = stage.train_step(ctx, step)
            step += 1
            skip = guard.update(output.loss, step)  # raises after too many in a row: no checkpoint then
            consumed += output.samples
            applied_lr = optimizer.param_groups[0]["lr"]  # what this update uses (logged below)
            grad_norm = None
            if skip:
                optimizer.zero_grad()  # non-finite loss: non-finite gradients somewhere, no update
            else:
                update_successful, grad_norm = optimizer_step(optimizer)
                if update_successful:
                    scheduler.step(increment=1)  # the schedule counts optimizer steps
            elapsed = time.perf_counter() - started
            losses[step] = output.loss
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{output.loss:.4f}")
            throughput = meter.update(output.tokens, elapsed)
            record = {"step": step, "loss": output.loss, "lr": applied_lr,
                      "grad_norm": grad_norm, "skipped_steps": guard.total_skipped,
                      "consumed_samples": consumed, "samples_per_s": output.samples / elapsed,
                      "tokens_per_s": throughput.tokens_per_second,
                      "model_tflops_per_gpu": throughput.model_tflops_per_gpu, "mfu": throughput.mfu,
                      **memory_metrics(), **output.metrics}
            if rank == 0:
                with open(metrics_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            if step % cfg.train.log_interval == 0:
                metrics.log_scalars(step, {k: v for k, v in record.items()
                                           if k != "step" and isinstance(v, (int, float)) and v is not None})
                if rank == 0:
                    logger.info("%s step %d/%d loss %.5f lr %.3g grad norm %s samples/s %.1f", stage.name, step,
                                total_steps, output.loss, record["lr"],
                                "skipped" if grad_norm is None else f"{grad_norm:.3f}", record["samples_per_s"])
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                metrics.log_scalars(step, stage.evaluate(ctx, step))
            if preemption.any_rank_received():
                logger.info("preemption signal received: saving at step %d and exiting", step)
                save()
                preempted = True
                break
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0 and not skip:
                save()  # never inside a run of non-finite losses
        else:
            if not (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0 and step > 0):
                save()
    finally:
        if progress is not None:
            progress.close()
        metrics.close()
        stage.close()
    return RunResult(steps_done=step, losses=losses, preempted=preempted, skipped_steps=guard.total_skipped)


def _stage_file_hook(stage: Stage) -> Dict:
    """Per-rank stage files go inside the checkpoint (stages that write none pass nothing)."""
    if type(stage).write_checkpoint_files is Stage.write_checkpoint_files:
        return {}
    return {"write_extra_files": stage.write_checkpoint_files}
