"""The shared training loop with the language-model stage: parity across layouts, exact resume after
kill -9 / SIGTERM, resume at another TP, interrupted saves, shape mismatches, non-finite losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_conan.config.loader import apply_overrides, from_dict, to_dict
from megatron_conan.testing.distributed import run_distributed
from megatron_conan.config.run import LanguageModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny", "pretrain.yaml")


def _config(run_dir, *overrides) -> dict:
    import yaml

    with open(TINY) as handle:
        values = yaml.safe_load(handle)
    values["run_dir"] = str(run_dir)
    apply_overrides(values, ["train.eval_interval=0", "train.log_interval=1", *overrides])
    return to_dict(from_dict(LanguageModelConfig, values))


def _train_body(rank, world_size, cfg_dict, nan_steps=()):
    from megatron_conan.training.lm_stage import LanguageModelStage
    from megatron_conan.training.lm_step import lm_forward_step
    from megatron_conan.training.trainer import train

    forward = lm_forward_step
    if nan_steps:
        calls = {"n": 0}

        def forward(data_iterator, model):  # noqa: F811 - poisons the loss of chosen steps
            output, loss_func = lm_forward_step(data_iterator, model)
            calls["n"] += 1
            step = (calls["n"] - 1) // 4 + 1  # 4 micro-batches per step in these runs
            if step in nan_steps:
                output = output * float("nan")
            return output, loss_func

    result = train(from_dict(LanguageModelConfig, cfg_dict), LanguageModelStage("pretrain", forward))
    return {"losses": result.losses, "steps": result.steps_done, "skipped": result.skipped_steps}


def _metrics(run_dir):
    by_step = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            by_step[record["step"]] = record["loss"]
    return by_step


def test_tp2pp2_trains_and_matches_tp1_from_the_same_weights(tmp_path):
    init = run_distributed(_train_body, 1, args=(_config(tmp_path / "init", "train.train_steps=0"),))
    assert init[0]["steps"] == 0
    weights = str(tmp_path / "init" / "checkpoints")
    steps = "train.train_steps=6"
    tp1 = run_distributed(_train_body, 1, args=(_config(tmp_path / "tp1", steps, f"checkpoint.load_dir={weights}"),))[0]
    tp2pp2 = run_distributed(_train_body, 4, args=(_config(
        tmp_path / "tp2pp2", steps, f"checkpoint.load_dir={weights}",
        "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"),))[0]
    for step in (1, 2, 3):
        assert abs(tp1["losses"][step] - tp2pp2["losses"][step]) < 1e-5, (step, tp1, tp2pp2)
    assert tp2pp2["losses"][6] < tp2pp2["losses"][1] - 0.02


def _launch(run_dir, *overrides):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_conan.training.pretrain", "--config", TINY, f"run_dir={run_dir}",
         "train.eval_interval=0", *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, so a kill reaches its helper processes too
    )


def _wait_for_step(run_dir, step, process, timeout=120):
    deadline = time.monotonic() + timeout
    path = os.path.join(run_dir, "metrics.jsonl")
    while time.monotonic() < deadline:
        if os.path.exists(path) and _metrics(run_dir) and max(_metrics(run_dir)) >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{process.stdout.read()}")
        time.sleep(0.1)  # a tighter poll competes with the run for the 2 cores
    raise AssertionError(f"step {step} not reached in {timeout} s")


LONG_RUN = ("train.train_steps=30", "checkpoint.save_interval=5", "checkpoint.keep_last=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    process = _launch(run_dir, *LONG_RUN)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return _metrics(run_dir)


def test_kill_9_then_resume_reproduces_the_losses_exactly(tmp_path, uninterrupted):
    process = _launch(tmp_path, *LONG_RUN)
    _wait_for_step(tmp_path, 12, process)
    assert process.poll() is None, "the run finished before it could be killed"
    # the whole job, as a scheduler kills it (megatron-core's checkpoint writer starts a
    # multiprocessing manager that would outlive a SIGKILL of the main process alone)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(_metrics(tmp_path))
    assert killed_at < 30
    with open(tmp_path / "checkpoints" / "latest") as handle:
        resumed_from = int(handle.read().strip().split("_")[1])
    assert resumed_from <= killed_at
    process = _launch(tmp_path, *LONG_RUN)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "resumed from" in output
    resumed = _metrics(tmp_path)
    for step in range(resumed_from + 1, 31):
        assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, uninterrupted):
    process = _launch(tmp_path, *LONG_RUN)
    _wait_for_step(tmp_path, 7, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    stopped_at = max(_metrics(tmp_path))
    assert stopped_at < 30, "SIGTERM arrived after the run ended"
    with open(tmp_path / "checkpoints" / "latest") as handle:
        assert handle.read().strip() == f"iter_{stopped_at:07d}"
    process = _launch(tmp_path, *LONG_RUN)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    resumed = _metrics(tmp_path)
    for step in range(stopped_at + 1, 31):
        assert resumed[step] == uninterrupted[step], step


def test_resume_at_a_different_tensor_parallel_size(tmp_path):
    base = ["checkpoint.save_interval=3", "checkpoint.keep_last=5"]
    full = run_distributed(_train_body, 1, args=(_config(tmp_path / "full", "train.train_steps=6", *base),))[0]
    first = run_distributed(_train_body, 1, args=(_config(tmp_path / "resharded", "train.train_steps=6",
                                                          "train.exit_after_steps=3", *base),))[0]
    assert first["steps"] == 3
    second = run_distributed(_train_body, 2, args=(_config(tmp_path / "resharded", "train.train_steps=6",
                                                           "parallel.tensor_parallel=2", *base),))[0]
    for step in (4, 5, 6):
        assert abs(second["losses"][step] - full["losses"][step]) < 1e-5, (step, second, full)


def _interrupted_save_body(rank, world_size, cfg_dict):
    from megatron.core import dist_checkpointing

    from megatron_conan.checkpoint import save as saving
    from megatron_conan.training.trainer import train

    original = dist_checkpointing.save
    calls = {"n": 0}

    def failing_save(state, directory, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 save dies after writing part of its files
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "half_written.distcp"), "wb") as handle:
                handle.write(b"\0" * 1024)
            raise RuntimeError("disk full (simulated)")
        return original(state, directory, *args, **kwargs)

    saving.dist_checkpointing.save = failing_save
    try:
        train(from_dict(LanguageModelConfig, cfg_dict))
    except RuntimeError as error:
        message = str(error)
    else:
        message = None
    saving.dist_checkpointing.save = original
    return message


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    cfg = _config(tmp_path, "train.train_steps=6", "checkpoint.save_interval=2")
    message = run_distributed(_interrupted_save_body, 1, args=(cfg,))[0]
    assert message == "disk full (simulated)"
    save_dir = tmp_path / "checkpoints"
    assert (save_dir / "latest").read_text().strip() == "iter_0000002"
    assert (save_dir / "iter_0000004.partial").exists() and not (save_dir / "iter_0000004").exists()
    resumed = run_distributed(_train_body, 1, args=(cfg,))[0]
    assert sorted(resumed["losses"]) == [3, 4, 5, 6]
    assert not (save_dir / "iter_0000004.partial").exists()


def _expect_error_body(rank, world_size, cfg_dict, nan_steps=()):
    try:
        _train_body(rank, world_size, cfg_dict, nan_steps)
    except Exception as error:  # noqa: BLE001 - the test inspects it
        return f"{type(error).__name__}: {error}"
    return None


def test_loading_a_checkpoint_of_another_shape_names_the_fields(tmp_path):
    run_distributed(_train_body, 1, args=(_config(tmp_path, "train.train_steps=1"),))
    message = run_distributed(_expect_error_body, 1, args=(
        _config(tmp_path, "train.train_steps=2", "model.overrides={hidden_size: 128, ffn_hidden_size: 256}"),))[0]
    assert message.startswith("CheckpointMismatchError"), message
    assert "hidden_size: checkpoint 64 vs model 128" in message and "ffn_hidden_size" in message


def test_non_finite_losses_skip_steps_then_stop_without_checkpointing(tmp_path):
    result = run_distributed(_train_body, 1, args=(
        _config(tmp_path / "skip", "train.train_steps=4", "checkpoint.save_interval=0"), (2,)))[0]
    assert result["skipped"] == 1 and result["steps"] == 4
    message = run_distributed(_expect_error_body, 1, args=(
        _config(tmp_path / "stop", "train.train_steps=8", "checkpoint.save_interval=1",
                "train.max_consecutive_nonfinite=2"), (3, 4, 5)))[0]
    assert message is not None and "NonFiniteLossError" in message, message
    assert (tmp_path / "stop" / "checkpoints" / "latest").read_text().strip() == "iter_0000002"


def _precisions_body(rank, world_size, base_dir):
    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        cfg = _config(os.path.join(base_dir, precision), "train.train_steps=4", f"train.precision={precision}",
                      "parallel.use_distributed_optimizer=true", "train.recompute=selective")
        results[precision] = _train_body(rank, world_size, cfg)["losses"]
    return results


def test_bf16_and_fp16_with_the_distributed_optimizer_track_fp32(tmp_path):
    results = run_distributed(_precisions_body, 2, args=(str(tmp_path),))[0]
    for precision in ("bf16", "fp16"):
        for step in range(1, 5):
            assert abs(results[precision][step] - results["fp32"][step]) < 0.05, (precision, step, results)


def test_distributed_optimizer_state_resumes_under_another_layout(tmp_path):
    base = ["checkpoint.save_interval=3", "checkpoint.keep_last=5", "parallel.use_distributed_optimizer=true",
            "train.train_steps=6"]
    full = run_distributed(_train_body, 2, args=(_config(tmp_path / "full", *base),))[0]
    first = run_distributed(_train_body, 2, args=(_config(tmp_path / "moved", "train.exit_after_steps=3", *base),))[0]
    assert first["steps"] == 3
    second = run_distributed(_train_body, 4, args=(_config(tmp_path / "moved", "parallel.tensor_parallel=2", *base),))[0]
    for step in (4, 5, 6):
        assert abs(second["losses"][step] - full["losses"][step]) < 1e-5, (step, second, full)


def test_language_model_stages_refuse_the_soft_mask(tmp_path):
    """Any a > 0 lets a position attend to the tokens it predicts: pretrain and SFT refuse it
    (the soft-mask schedule in training is tested with stage 3, tests/training/test_embed_weak.py)."""
    soft_mask = "model.soft_mask={schedule: linear, total_steps: 4, backend: reference}"
    message = run_distributed(_expect_error_body, 1, args=(_config(tmp_path, "train.train_steps=2", soft_mask),))[0]
    assert message is not None and message.startswith("ConfigError") and "model.soft_mask" in message, message
    assert not (tmp_path / "checkpoints").exists()
