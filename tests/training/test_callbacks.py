"""The Trainer's callbacks on their own (no model): when checkpoints are saved, the default order, and
that every stage id of the registry is an entry point's."""

import ast
import os
from types import SimpleNamespace

import pytest

from megatron_conan.config.loader import from_dict
from megatron_conan.config.run import STAGE_CONFIGS, LanguageModelConfig
from megatron_conan.errors import ConfigError

from megatron_conan.training.callbacks import (Checkpointing, ConsoleLog, Evaluation, MetricsFile, Preemption,
                                               ProgressBar, ScalarSink, default_callbacks)
from megatron_conan.training.hooks import StepRecord
from megatron_conan.training.stage_registry import STAGES, build_stage
from megatron_conan.training.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Run:
    """What Checkpointing reads of a Trainer, and a record of its saves."""

    def __init__(self):
        self.step_count, self.preempted, self.saved_at = 0, False, []

    def save(self):
        self.saved_at.append(self.step_count)


def _drive(checkpointing, steps, skipped=(), preempt_at=None):
    run = _Run()
    for step in range(1, steps + 1):
        run.step_count = step
        run.preempted = step == preempt_at
        checkpointing.on_step_end(run, StepRecord(step=step, loss=1.0, skipped=step in skipped, grad_norm=None))
        if run.preempted:
            break
    checkpointing.on_fit_end(run)
    return run.saved_at


def test_checkpoints_every_interval_and_at_the_end_unless_just_saved():
    assert _drive(Checkpointing(3), 7) == [3, 6, 7]
    assert _drive(Checkpointing(3), 6) == [3, 6]
    assert _drive(Checkpointing(0), 4) == [4]
    assert _drive(Checkpointing(5), 0) == [0]  # a run of no steps saves its initial weights


def test_no_interval_save_right_after_a_skipped_step():
    assert _drive(Checkpointing(2), 5, skipped={4}) == [2, 5]


def test_preemption_saves_that_step_once_and_nothing_at_the_end():
    assert _drive(Checkpointing(2), 9, preempt_at=3) == [2, 3]
    assert _drive(Checkpointing(2), 9, preempt_at=4) == [2, 4]  # once, though on the interval


def _cfg(tmp_path, eval_interval, progress_bar):
    train = SimpleNamespace(log_interval=5, eval_interval=eval_interval, progress_bar=progress_bar, wandb_project=None)
    return SimpleNamespace(run_dir=str(tmp_path), train=train, checkpoint=SimpleNamespace(save_interval=10))


def test_default_order_evaluation_logs_through_the_sink_and_checkpointing_comes_last(tmp_path, monkeypatch):
    monkeypatch.setattr("megatron_conan.training.callbacks.to_dict", lambda cfg: {})
    callbacks = default_callbacks(_cfg(tmp_path, eval_interval=20, progress_bar=True))
    assert [type(c) for c in callbacks] == [ProgressBar, MetricsFile, ScalarSink, ConsoleLog, Evaluation, Preemption,
                                           Checkpointing]
    assert callbacks[4].sink is callbacks[2]
    assert callbacks[1].path == os.path.join(str(tmp_path), "metrics.jsonl")
    quiet = default_callbacks(_cfg(tmp_path, eval_interval=0, progress_bar=False))
    assert [type(c) for c in quiet] == [MetricsFile, ScalarSink, ConsoleLog, Preemption, Checkpointing]


def test_every_entry_point_runs_a_registered_stage_and_every_stage_has_one():
    used = set()
    training = os.path.join(REPO, "megatron_conan", "training")
    for name in os.listdir(training):
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(open(os.path.join(training, name), encoding="utf-8").read())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_stage":
                used.add(node.args[1].value)
    assert used == set(STAGES)
    assert {build_stage(stage_id).name for stage_id in STAGES} == set(STAGES)
    assert set(STAGE_CONFIGS) == set(STAGES)  # each stage's config class is named by the same ids


def test_a_stage_refuses_another_stages_config(tmp_path):
    with pytest.raises(ConfigError, match="the embed-weak stage takes its config as EmbeddingConfig, not LanguageModelConfig"):
        train(from_dict(LanguageModelConfig, {"run_dir": str(tmp_path)}), stage="embed-weak")
