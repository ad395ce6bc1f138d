"""TensorBoard/W&B logging, throughput and MFU arithmetic, memory metrics, the non-finite guard."""

import math
import sys
import types

import pytest
import torch

from megatron_conan.training.metrics import (
    H100_BF16_DENSE_PEAK_FLOPS,
    NonFiniteGuard,
    NonFiniteLossError,
    ThroughputMeter,
    TrainingLogger,
    default_is_writer,
    memory_metrics,
)


def _read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_are_written_and_readable(tmp_path):
    with TrainingLogger(str(tmp_path / "tb"), is_writer=True) as training_logger:
        assert not training_logger.uses_wandb
        training_logger.log_scalars(1, {"train/loss": 2.5, "train/lr": 1e-4})
        training_logger.log_scalars(2, {"train/loss": torch.tensor(2.25)})
        training_logger.log_text("config", "model: conan_1p4b")
    scalars = _read_scalars(tmp_path / "tb")
    assert [(s, pytest.approx(v)) for s, v in scalars["train/loss"]] == [(1, 2.5), (2, 2.25)]
    assert scalars["train/lr"][0][1] == pytest.approx(1e-4)


def test_non_writer_writes_nothing(tmp_path):
    training_logger = TrainingLogger(str(tmp_path / "tb"), is_writer=False)
    training_logger.log_scalars(1, {"train/loss": 1.0})
    training_logger.flush()
    training_logger.close()
    assert not (tmp_path / "tb").exists()


def test_single_process_is_the_writer():
    assert default_is_writer()


class _FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.logged = []
        self.finished = False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_used_when_importable_and_enabled(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(_FakeRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)

    TrainingLogger(str(tmp_path / "off"), is_writer=True).close()
    assert runs == []  # installed but not enabled

    training_logger = TrainingLogger(str(tmp_path / "on"), is_writer=True, use_wandb=True,
                                     wandb_project="conan", run_config={"lr": 1e-4})
    training_logger.log_scalars(3, {"train/loss": 1.5})
    training_logger.close()
    (run,) = runs
    assert run.init_kwargs["project"] == "conan" and run.init_kwargs["config"] == {"lr": 1e-4}
    assert run.logged == [(3, {"train/loss": 1.5})] and run.finished


def test_wandb_missing_falls_back_to_tensorboard(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import raises ImportError
    with TrainingLogger(str(tmp_path / "tb"), is_writer=True, use_wandb=True) as training_logger:
        assert not training_logger.uses_wandb
        training_logger.log_scalars(1, {"train/loss": 1.0})
    assert "wandb is not installed" in caplog.text
    assert "train/loss" in _read_scalars(tmp_path / "tb")


def test_throughput_and_mfu_arithmetic():
    flops_per_token = 1.0404516864e10  # conan_1p4b at sequence 4096
    meter = ThroughputMeter(flops_per_token, num_gpus=64)
    tokens = 256 * 4096
    step = meter.update(tokens, 2.0)
    assert step.tokens_per_second == tokens / 2.0
    assert step.tokens_per_second_per_gpu == tokens / 2.0 / 64
    expected_flops_per_gpu = tokens * flops_per_token / 2.0 / 64
    assert step.model_tflops_per_gpu == pytest.approx(expected_flops_per_gpu / 1e12)
    assert step.mfu == pytest.approx(expected_flops_per_gpu / 989e12)
    assert step.mfu == pytest.approx(0.0862, abs=1e-4)  # 85.2 TFLOP/s per GPU

    meter.update(tokens, 1.0)
    average = meter.average()
    assert average.tokens_per_second == pytest.approx(2 * tokens / 3.0)
    scalars = average.as_scalars()
    assert scalars["throughput/mfu"] == average.mfu
    meter.reset()
    assert meter.average() is None


def test_throughput_custom_peak_and_validation():
    meter = ThroughputMeter(1e9, num_gpus=1, peak_flops_per_gpu=1e12)
    assert meter.measure(500, 1.0).mfu == pytest.approx(0.5)
    assert H100_BF16_DENSE_PEAK_FLOPS == 989e12
    with pytest.raises(ValueError, match="step time"):
        meter.measure(1, 0.0)
    with pytest.raises(ValueError, match="num_gpus"):
        ThroughputMeter(1e9, num_gpus=0)


def test_memory_metrics_on_cpu_report_rss():
    metrics = memory_metrics()
    if torch.cuda.is_available():
        assert metrics["memory/max_allocated_gib"] >= 0
    else:
        assert 0 < metrics["memory/rss_gib"] < 1024


def test_guard_skips_non_finite_and_resets_on_finite():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.update(2.0) is False
    assert guard.update(float("nan")) is True
    assert guard.update(torch.tensor(float("inf"))) is True
    assert guard.consecutive == 2
    assert guard.update(1.0) is False
    assert guard.consecutive == 0 and guard.total_skipped == 2


def test_guard_raises_after_k_consecutive():
    guard = NonFiniteGuard(max_consecutive=3)
    guard.update(math.nan)
    guard.update(-math.inf)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses at step 7"):
        guard.update(math.nan, step=7)
    assert guard.total_skipped == 3


def test_guard_state_round_trip_and_validation():
    guard = NonFiniteGuard(max_consecutive=2)
    guard.update(math.nan)
    resumed = NonFiniteGuard(max_consecutive=2)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.total_skipped == 1
    with pytest.raises(NonFiniteLossError):
        resumed.update(math.nan)
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)
