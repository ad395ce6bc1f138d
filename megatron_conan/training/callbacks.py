"""What happens around a training step, as callbacks of the Trainer (``training/trainer.py``; the
interface, :class:`Callback`, :class:`StepRecord` and what a callback sees of the trainer, is
``training/hooks.py``).

A callback sees the run at three points, or at the error that ended it, and is closed at the end,
whatever happened:

    on_fit_start(trainer)         after resume, before the first step of this process
    on_step_end(trainer, record)  after each optimizer step, in list order
    on_fit_end(trainer)           the loop ended without an error (last step or preemption)
    on_error(trainer, error)      the resume, a step or a hook raised on this rank: every callback's,
                                  in list order, then the error propagates (no collectives in it)
    close()                       always, last (files, writers, progress bars)

:func:`default_callbacks` gives every run's list, in this order (it matters: evaluation logs through
the scalar sink, and a preemption save replaces the interval save of that step):

    ProgressBar          tqdm on rank 0 (``train.progress_bar``)
    MetricsFile          one JSON line per step in ``<run_dir>/metrics.jsonl`` (rank 0)
    ScalarSink           TensorBoard (and W&B) every ``train.log_interval`` steps
    ConsoleLog           one log line every ``train.log_interval`` steps (rank 0)
    Evaluation           the stage's held-out numbers every ``train.eval_interval`` steps
    Preemption           SIGTERM / SIGUSR1 on any rank: stop before the first step or after this one
    Checkpointing        save every ``checkpoint.save_interval`` steps, on preemption and at the end
"""

from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import torch.distributed as dist
from tqdm import tqdm

from megatron_conan import stop_signals
from megatron_conan.config.loader import to_dict
from megatron_conan.distributed.device import current_placement
from megatron_conan.training.hooks import Callback
from megatron_conan.training.metrics import TrainingLogger

logger = logging.getLogger(__name__)


class ProgressBar(Callback):
    """A tqdm bar of the run's steps on rank 0, the loss beside it."""

    def __init__(self):
        self.bar = None

    def on_fit_start(self, trainer):
        if dist.get_rank() == 0:
            self.bar = tqdm(total=trainer.last_steps, initial=trainer.step_count, desc=trainer.stage.name,
                            unit="step", leave=False, dynamic_ncols=True)

    def on_step_end(self, trainer, step):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{step.loss:.4f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsFile(Callback):
    """Appends each step's record to `path` as one JSON line (rank 0). A resumed run appends again
    from the step after its checkpoint: the last line of a step wins. Each line is handed to the OS
    when its step ends; a run that fails also syncs the file to disk, so the steps before the failure
    outlive the host."""

    def __init__(self, path: str):
        self.path = path

    def on_step_end(self, trainer, step):
        if dist.get_rank() == 0:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(step.record) + "\n")

    def on_error(self, trainer, error):
        if dist.get_rank() == 0 and os.path.exists(self.path):
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.flush()
                os.fsync(handle.fileno())


class ScalarSink(Callback):
    """The numeric fields of every `interval`-th record to TensorBoard under `log_dir` (and W&B when
    `wandb_project` is set), from the writer rank (:class:`TrainingLogger`)."""

    def __init__(self, log_dir: str, interval: int, wandb_project: Optional[str] = None,
                 run_config: Optional[dict] = None):
        self.log_dir, self.interval = log_dir, interval
        self.wandb_project, self.run_config = wandb_project, run_config
        self.writer: Optional[TrainingLogger] = None

    def on_fit_start(self, trainer):
        self.writer = TrainingLogger(self.log_dir, use_wandb=self.wandb_project is not None,
                                     wandb_project=self.wandb_project, run_config=self.run_config)

    def on_step_end(self, trainer, step):
        if step.step % self.interval == 0:
            self.log(step.step, {name: value for name, value in step.record.items()
                                 if name != "step" and isinstance(value, (int, float)) and value is not None})

    def log(self, step: int, scalars) -> None:
        self.writer.log_scalars(step, scalars)

    def close(self):
        if self.writer is not None:
            self.writer.close()


class ConsoleLog(Callback):
    """One line every `interval` steps on rank 0: loss, lr, grad norm (or 'skipped'), samples/s."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer, step):
        if step.step % self.interval == 0 and dist.get_rank() == 0:
            logger.info("%s step %d/%d loss %.5f lr %.3g grad norm %s samples/s %.1f", trainer.stage.name,
                        step.step, trainer.ctx.total_steps, step.loss, step.record["lr"],
                        "skipped" if step.grad_norm is None else f"{step.grad_norm:.3f}",
                        step.record["samples_per_s"])


class Evaluation(Callback):
    """The stage's held-out numbers every `interval` steps, written through `sink`."""

    def __init__(self, interval: int, sink: ScalarSink):
        self.interval, self.sink = interval, sink

    def on_step_end(self, trainer, step):
        if step.step % self.interval == 0:
            self.sink.log(step.step, trainer.stage.evaluate(trainer.ctx, step.step))


class Preemption(Callback):
    """SIGTERM / SIGUSR1 (SLURM time limit, preemption, scancel) on any rank stop the run; the ranks
    agree with one all-reduce before the first step (a signal during model build or checkpoint load:
    stop there, nothing saved, nothing new since ``latest``) and one after each step
    (:class:`Checkpointing` saves that step). The signals are those the entry point handles from its
    start (:mod:`megatron_conan.stop_signals`); a run started from Python has them handled here."""

    def __init__(self):
        self.signals: Optional[stop_signals.StopSignals] = None
        self._own = False

    def on_fit_start(self, trainer):
        self.signals = stop_signals.installed()
        if self.signals is None:
            self.signals, self._own = stop_signals.StopSignals(exit_at_once=False).install(), True
        if self._agreed():
            logger.info("stop signal received during start-up: stopping at step %d before training, nothing saved",
                        trainer.step_count)
            trainer.preempted = True

    def _agreed(self) -> bool:
        placement = current_placement()
        flag = placement.tensor([1.0 if self.signals.received is not None else 0.0])
        placement.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def on_step_end(self, trainer, step):
        if self._agreed():
            logger.info("preemption signal received: saving at step %d and exiting", step.step)
            trainer.preempted = True

    def close(self):
        if self._own:
            self.signals.uninstall()
            self._own = False


class Checkpointing(Callback):
    """Saves every `interval` steps (0: never in the loop) except after a skipped step (never inside a
    run of non-finite losses), at once when the run is preempted, and at the end of a run whose last
    step was not just saved (a run of 0 steps saves its initial weights)."""

    def __init__(self, interval: int):
        self.interval = interval

    def _on_interval(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def on_step_end(self, trainer, step):
        if trainer.preempted or (self._on_interval(step.step) and not step.skipped):
            trainer.save()

    def on_fit_end(self, trainer):
        if not trainer.preempted and not (self._on_interval(trainer.step_count) and trainer.step_count > 0):
            trainer.save()


def default_callbacks(cfg) -> List[Callback]:
    """Every run's callbacks, configured from its RunConfig (the order is the module doc's)."""
    train = cfg.train
    sink = ScalarSink(os.path.join(cfg.run_dir, "tensorboard"), train.log_interval,
                      wandb_project=train.wandb_project, run_config=to_dict(cfg))
    callbacks: List[Callback] = [ProgressBar()] if train.progress_bar else []
    callbacks += [MetricsFile(os.path.join(cfg.run_dir, "metrics.jsonl")), sink, ConsoleLog(train.log_interval)]
    if train.eval_interval:
        callbacks.append(Evaluation(train.eval_interval, sink))
    return callbacks + [Preemption(), Checkpointing(cfg.checkpoint.save_interval)]
