"""The training loop shared by the stage entry points.

One call, :func:`train`, runs a whole (possibly resumed) run on megatron-core's pieces:
process groups -> model chunks (our spec) -> DDP -> megatron optimizer + LR schedule -> for each
step: this DP rank's micro-batches, pipeline schedule, gradient reduction, update, logging,
periodic evaluation and checkpoints. SIGTERM / SIGUSR1 (SLURM preemption) trigger a checkpoint at
the end of the current step and a clean exit; a killed run resumes from ``latest`` and reproduces
the losses of an uninterrupted run exactly, because the data position is the only data state
(``consumed_samples``) and everything else is in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_conan.config.loader import dump_config, to_dict
from megatron_conan.config.model import build_transformer_config
from megatron_conan.distributed.parallel import describe_layout, initialize_model_parallel
from megatron_conan.models.conan import build_model_chunks
from megatron_conan.ops.soft_mask_attention.core_attention import (
    get_soft_mask_state,
    load_soft_mask_state,
    set_soft_mask_step,
)
from megatron_conan.training import checkpointing
from megatron_conan.training.config import RunConfig
from megatron_conan.training.lm_step import lm_forward_step
from megatron_conan.training.step import build_optimizer, evaluate_loss, train_step, wrap_model

logger = logging.getLogger(__name__)


class SyntheticLMDataset(torch.utils.data.Dataset):
    """Deterministic random-token sequences: smoke tests and throughput runs with no files."""

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int):
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        # A learnable signal: each sequence repeats a short random motif.
        motif = torch.randint(0, self.vocab_size, (8,), generator=generator)
        tokens = motif.repeat(self.seq_length // 8 + 2)[: self.seq_length + 1]
        return {
            "tokens": tokens[:-1].clone(),
            "labels": tokens[1:].clone(),
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]
            if key in ("tokens", "labels", "loss_mask", "position_ids")}


def step_microbatches(dataset, consumed_samples: int, global_batch: int, micro_batch: int,
                      dp_rank: int, dp_size: int) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at `consumed_samples`.

    Global batch b covers dataset indices [consumed, consumed + global_batch) (wrapping around
    epochs); DP rank r takes the r-th contiguous slice. Datasets shuffle internally (GPTDataset).
    """
    per_rank = global_batch // dp_size
    start = consumed_samples + dp_rank * per_rank
    indices = [(start + i) % len(dataset) for i in range(per_rank)]
    return [collate([dataset[j] for j in indices[i:i + micro_batch]]) for i in range(0, per_rank, micro_batch)]


def build_datasets(cfg: RunConfig, model_config, num_train_samples: int, num_valid_samples: int):
    """(train, valid) datasets of the run's data section."""
    data = cfg.data
    if data.kind == "synthetic":
        return (SyntheticLMDataset(model_config.vocab_size, cfg.train.seq_length, max(num_train_samples, 1), cfg.train.seed),
                SyntheticLMDataset(model_config.vocab_size, cfg.train.seq_length, max(num_valid_samples, 1), cfg.train.seed + 1))
    from megatron_conan.data.tokenizer import ConanTokenizer

    if not data.tokenizer:
        raise ValueError(f"data.tokenizer is required for data.kind={data.kind}")
    tokenizer = ConanTokenizer(data.tokenizer)
    if data.kind == "blended":
        from megatron_conan.data.pretraining import BlendedDataConfig, build_pretrain_datasets

        blend = BlendedDataConfig.from_dict(dict(data.blend))
        train, valid, _ = build_pretrain_datasets(blend, tokenizer, cfg.train.seq_length,
                                                  (num_train_samples, num_valid_samples, 0))
        return train, valid
    from megatron_conan.data.sft import build_sft_datasets

    if not data.sft_prefix:
        raise ValueError("data.sft_prefix is required for data.kind=sft")
    train, valid, _ = build_sft_datasets(data.sft_prefix, tokenizer, cfg.train.seq_length, split=data.split,
                                         seed=cfg.train.seed)
    return train, valid


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; ranks agree on it with an all-reduce once per step."""

    def __init__(self):
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def any_rank_received(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _transformer_overrides(cfg: RunConfig) -> Dict:
    overrides = dict(cfg.model.transformer_overrides)
    if cfg.train.recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif cfg.train.recompute == "selective":
        overrides.update(recompute_granularity="selective")
    return overrides


def build_scheduler(optimizer, cfg: RunConfig, total_steps: int) -> OptimizerParamScheduler:
    warmup = int(round(cfg.optimizer.warmup_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=cfg.optimizer.decay_style,
        start_wd=cfg.optimizer.weight_decay, end_wd=cfg.optimizer.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )


@dataclass
class RunResult:
    """What a finished (or preempted) run reports."""

    steps_done: int
    losses: Dict[int, float]
    preempted: bool
    skipped_steps: int


def train(cfg: RunConfig, forward_step_func: Callable = lm_forward_step, stage: str = "pretrain") -> RunResult:
    """Run (or resume) a training run; collective over the torch.distributed world."""
    model_config = cfg.model.build()
    data_parallel = initialize_model_parallel(cfg.parallel, seed=cfg.train.seed)
    rank = dist.get_rank()
    transformer_config = build_transformer_config(
        model_config, cfg.parallel, precision=cfg.train.precision,
        transformer_overrides=_transformer_overrides(cfg),
    )
    num_microbatches = cfg.train.num_microbatches(data_parallel)
    total_steps = cfg.train.steps()
    save_dir = cfg.checkpoint_dir()
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    logger.info("%s", describe_layout())

    chunks = wrap_model(build_model_chunks(model_config, transformer_config, core_attention=cfg.model.core_attention()),
                        transformer_config,
                        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    optimizer = build_optimizer(
        chunks, transformer_config, lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr, weight_decay=cfg.optimizer.weight_decay,
        clip_grad=cfg.optimizer.clip_grad, adam_beta1=cfg.optimizer.adam_beta1,
        adam_beta2=cfg.optimizer.adam_beta2, adam_eps=cfg.optimizer.adam_eps,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    scheduler = build_scheduler(optimizer, cfg, total_steps)

    step, consumed, common = 0, 0, {}
    latest = checkpointing.read_latest(save_dir)
    if latest is not None:
        common = checkpointing.load_checkpoint(latest, chunks, optimizer, scheduler, model_config)
        step, consumed = common["step"], common["consumed_samples"]
        logger.info("resumed from %s at step %d (%d samples consumed)", latest, step, consumed)
    elif cfg.checkpoint.load_dir:
        source = checkpointing.read_latest(cfg.checkpoint.load_dir) or cfg.checkpoint.load_dir
        checkpointing.load_checkpoint(source, chunks, optimizer, scheduler, model_config,
                                      weights_only=cfg.checkpoint.load_weights_only)
        logger.info("initialised weights from %s", source)

    global_batch = cfg.train.global_batch_size
    # Every evaluation reads the same first `eval_steps` global batches of the validation split.
    eval_batches = cfg.train.eval_steps if cfg.train.eval_interval else 0
    train_ds, valid_ds = build_datasets(cfg, model_config, total_steps * global_batch, eval_batches * global_batch)
    if eval_batches and (valid_ds is None or len(valid_ds) == 0):
        raise ValueError("train.eval_interval is set but the data has no validation split "
                         "(data.split / data.blend.split gives it no share)")
    dp_rank = parallel_state.get_data_parallel_rank()

    from megatron_conan.training.estimate import model_flops_per_token
    from megatron_conan.training.metrics import NonFiniteGuard, ThroughputMeter, TrainingLogger, memory_metrics

    metrics = TrainingLogger(os.path.join(cfg.run_dir, "tensorboard"),
                             use_wandb=cfg.train.wandb_project is not None, wandb_project=cfg.train.wandb_project,
                             run_config=to_dict(cfg))
    meter = ThroughputMeter(model_flops_per_token(model_config, cfg.train.seq_length), dist.get_world_size())
    guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite)
    if latest is not None and "nonfinite" in common.get("extra", {}):
        guard.load_state_dict(common["extra"]["nonfinite"])
    if latest is not None and common.get("extra", {}).get("soft_mask") is not None:
        load_soft_mask_state(chunks, common["extra"]["soft_mask"])  # refuses a changed schedule
    losses: Dict[int, float] = {}
    preemption = PreemptionFlag()
    metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    stop_at = min(total_steps, cfg.train.exit_after_steps or total_steps)
    preempted = False

    def save():
        checkpointing.save_checkpoint(save_dir, step, chunks, optimizer, scheduler, model_config, consumed,
                                      extra_state={"nonfinite": guard.state_dict(),
                                                   "soft_mask": get_soft_mask_state(chunks)},
                                      keep_last=cfg.checkpoint.keep_last)

    while step < stop_at:
        started = time.perf_counter()
        set_soft_mask_step(chunks, step)  # a(t) of this step (no-op without soft-mask layers)
        microbatches = step_microbatches(train_ds, consumed, global_batch, cfg.train.micro_batch_size,
                                         dp_rank, data_parallel)
        result = train_step(forward_step_func, [iter(microbatches) for _ in chunks],
                            chunks, optimizer, num_microbatches, cfg.train.seq_length, cfg.train.micro_batch_size)
        step += 1
        skip = guard.update(result.loss, step)  # raises after too many in a row: no checkpoint then
        consumed += global_batch
        if result.update_successful and not skip:
            scheduler.step(increment=1)  # the schedule counts optimizer steps
        elapsed = time.perf_counter() - started
        losses[step] = result.loss
        throughput = meter.update(global_batch * cfg.train.seq_length, elapsed)
        record = {"step": step, "loss": result.loss, "lr": optimizer.param_groups[0]["lr"],
                  "grad_norm": result.grad_norm, "skipped_steps": guard.total_skipped,
                  "consumed_samples": consumed, "tokens_per_s": throughput.tokens_per_second,
                  "model_tflops_per_gpu": throughput.model_tflops_per_gpu, "mfu": throughput.mfu,
                  **memory_metrics(), **result.extras}
        if rank == 0:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if step % cfg.train.log_interval == 0:
            metrics.log_scalars(step, {k: v for k, v in record.items()
                                       if k != "step" and isinstance(v, (int, float)) and v is not None})
            if rank == 0:
                logger.info("%s step %d/%d loss %.5f lr %.3g grad norm %s tokens/s %.0f", stage, step, total_steps,
                            result.loss, record["lr"], "skipped" if result.grad_norm is None else f"{result.grad_norm:.3f}",
                            throughput.tokens_per_second)
        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
            eval_losses = []
            for i in range(cfg.train.eval_steps):
                mbs = step_microbatches(valid_ds, i * global_batch, global_batch, cfg.train.micro_batch_size,
                                        dp_rank, data_parallel)
                eval_losses.append(evaluate_loss(forward_step_func, [iter(mbs) for _ in chunks],
                                                 chunks, num_microbatches, cfg.train.seq_length, cfg.train.micro_batch_size))
            metrics.log_scalars(step, {"eval_loss": sum(eval_losses) / len(eval_losses)})
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
    metrics.close()
    return RunResult(steps_done=step, losses=losses, preempted=preempted, skipped_steps=guard.total_skipped)
