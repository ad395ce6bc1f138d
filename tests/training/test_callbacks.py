"""The Trainer's callbacks: when checkpoints are saved, the default order, that every stage id of the
registry is an entry point's (no model), and what a run whose step raises tells them (a tiny run)."""

import ast
import json
import os
from types import SimpleNamespace

import pytest

from megatron_conan.config.loader import apply_overrides, from_dict, to_dict
from megatron_conan.config.run import STAGE_CONFIGS, LanguageModelConfig
from megatron_conan.errors import ConfigError

from megatron_conan.training.callbacks import (Checkpointing, ConsoleLog, Evaluation, MetricsFile, Preemption,
                                               ProgressBar, ScalarSink, default_callbacks)
from megatron_conan.training.hooks import StepRecord
from megatron_conan.training.stage_registry import STAGES, build_stage
from megatron_conan.testing.distributed import run_distributed
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


class _StepFailed(RuntimeError):
    pass


def _failing_run(rank, world_size, cfg_dict):
    """A tiny pretrain run whose third step raises; every default callback's on_error is counted."""
    from megatron_conan.training.lm_stage import LanguageModelStage
    from megatron_conan.training.trainer import Trainer

    class FailingStage(LanguageModelStage):
        def train_step(self, ctx, step, batch=None):
            if step == 2:
                raise _StepFailed("step 3 failed")
            return super().train_step(ctx, step, batch)

    cfg = from_dict(LanguageModelConfig, cfg_dict)
    calls = []
    callbacks = default_callbacks(cfg)
    for callback in callbacks:
        def on_error(trainer, error, callback=callback, own=callback.on_error):
            calls.append((type(callback).__name__, type(error).__name__, trainer.step_count))
            own(trainer, error)
        callback.on_error = on_error
    try:
        Trainer(cfg, FailingStage(), callbacks=callbacks).fit()
    except _StepFailed as error:
        return {"raised": str(error), "calls": calls}
    return {"raised": None, "calls": calls}


def test_a_failing_step_reaches_every_callbacks_on_error_once_and_still_propagates(tmp_path):
    import yaml

    with open(os.path.join(REPO, "examples", "tiny", "pretrain.yaml")) as handle:
        values = yaml.safe_load(handle)
    values["run_dir"] = str(tmp_path)
    apply_overrides(values, ["train.train_steps=4", "train.eval_interval=0", "train.global_batch_size=2",
                             "train.micro_batch_size=2", "train.seq_length=16", "checkpoint.save_interval=0",
                             "train.progress_bar=true"])
    cfg_dict = to_dict(from_dict(LanguageModelConfig, values))
    result = run_distributed(_failing_run, 1, args=(cfg_dict,))[0]
    assert result["raised"] == "step 3 failed"
    names = ["ProgressBar", "MetricsFile", "ScalarSink", "ConsoleLog", "Preemption", "Checkpointing"]
    assert result["calls"] == [(name, "_StepFailed", 2) for name in names]  # once each, in order, after step 2
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    assert lines[-1] == ""  # every line complete
    assert [json.loads(line)["step"] for line in lines[:-1]] == [1, 2]
    assert not os.path.exists(tmp_path / "checkpoints" / "latest")  # a failed step saves nothing


def test_the_metrics_file_syncs_to_disk_when_the_run_fails(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.distributed.get_rank", lambda: 0)
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    metrics = MetricsFile(str(tmp_path / "metrics.jsonl"))
    metrics.on_step_end(None, StepRecord(step=1, loss=1.0, skipped=False, grad_norm=None, record={"step": 1}))
    assert synced == []
    metrics.on_error(None, RuntimeError("boom"))
    assert synced == [str(tmp_path / "metrics.jsonl")]
