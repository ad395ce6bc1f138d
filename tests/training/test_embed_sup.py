"""Stage 4 (embed-sup): every task trains, DP=2 makes the same losses and DHNM decisions as one
process, a killed run resumes with the same losses, task sequence and DHNM state, a checkpoint
without the loader's position (earlier code's, committed under tests/checkpoint/fixtures) is
refused in one line, and bad task names are refused."""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy
import pytest

from megatron_conan.testing.distributed import run_distributed
from tests.training.conftest import communicate_or_kill, kill_group, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny", "embed_sup.yaml")
# DHNM thresholds that act on a briefly trained tiny model: a first score below 0.95 is "easy"
ACTIVE_DHNM = "embedding.dhnm={enabled: true, min_first_score: 0.95, drop_ratio: 1.2, max_score: 0.7}"


def _overrides(run_dir, data, tokenizer, *extra):
    return [f"run_dir={run_dir}", f"data.tokenizer={tokenizer}", f"data.contrastive_prefix={data}",
            "checkpoint.load_dir=null", ACTIVE_DHNM, *extra]


_metrics = read_metrics


def _dhnm_state(checkpoint_dir, store_prefix, num_negatives=3):
    """The whole DHNM state of a checkpoint's shards, loaded as one process's state."""
    from megatron_conan.data.contrastive import ContrastiveStore
    from megatron_conan.data.dhnm import DHNMState

    with open(os.path.join(checkpoint_dir, "latest")) as handle:
        path = os.path.join(checkpoint_dir, handle.read().strip())
    state = DHNMState(ContrastiveStore(store_prefix).pool_sizes(), num_negatives)
    state.load(path)
    return {"positions": state.positions.copy(), "first_scores": state.first_scores.copy(),
            "cursor": state.cursor.copy(), "exhausted": state.exhausted.copy()}


def _train_body(rank, world_size, argv):
    from megatron_conan.training.stage_main import parse_run_config
    from megatron_conan.training.trainer import train

    _, cfg = parse_run_config("embed-sup", argv)
    result = train(cfg, stage="embed-sup")
    return result.losses


def test_data_parallel_equals_one_process(embedding_data, supervised_store, tmp_path):
    """DP=2 with per-rank batches b equals one process with 2b: losses, tasks and DHNM decisions.
    (sts is left out: its CoSENT is per rank by design, over each rank's own pairs.)"""
    common = ["--config", TINY, "train.train_steps=8", "checkpoint.save_interval=0",
              "embedding.task_weights={retrieval: 3, clr: 3, classification: 2, sts: 0}"]
    one = run_distributed(_train_body, 1, args=(common + _overrides(
        tmp_path / "one", supervised_store, embedding_data["tokenizer"],
        "embedding.task_batch_sizes={retrieval: 4, clr: 4, classification: 4, sts: 8}"),))[0]
    two = run_distributed(_train_body, 2, args=(common + _overrides(
        tmp_path / "two", supervised_store, embedding_data["tokenizer"],
        "embedding.task_batch_sizes={retrieval: 2, clr: 2, classification: 2, sts: 4}"),))[0]
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        # float32 losses of up to ~45 (the Matryoshka sum at a large grad norm) carry ~4e-6 per
        # ulp, and the tiny recipe packs its texts: two ranks' rows hold other neighbours than one
        # rank's, so the sums round differently (step 3: 42.578072 vs 42.578083, every run). An
        # absolute 1e-5 is 2.6 ulps there; relative to the loss, 16 ulps. A wrong gather or label
        # would be off by far more.
        assert math.isclose(one[step], two[step], rel_tol=2e-6, abs_tol=1e-6), (step, one[step], two[step])
    first, second = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [first[s]["task"] for s in first] == [second[s]["task"] for s in second]
    assert sum(first[s].get("dhnm_replacements", 0) for s in first) > 0, "DHNM never acted: a vacuous test"
    for step in first:
        assert first[step].get("dhnm_replacements") == second[step].get("dhnm_replacements"), step
    a = _dhnm_state(str(tmp_path / "one" / "checkpoints"), supervised_store)
    b = _dhnm_state(str(tmp_path / "two" / "checkpoints"), supervised_store)
    for key in ("positions", "cursor", "exhausted"):  # the decisions: exactly equal
        numpy.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # S_0 is a cosine computed in another batch shape: equal up to float32 round-off
    numpy.testing.assert_allclose(a["first_scores"], b["first_scores"], rtol=0, atol=1e-5)


def _launch(run_dir, data, tokenizer, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_conan.training.embed_sup", "--config", TINY,
         *_overrides(run_dir, data, tokenizer, *extra)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


RUN = ("train.train_steps=20", "checkpoint.save_interval=4", "checkpoint.keep_last=2")


@pytest.mark.slow
def test_killed_run_resumes_losses_tasks_and_dhnm_exactly(embedding_data, supervised_store, tmp_path):
    tokenizer = embedding_data["tokenizer"]
    process = _launch(tmp_path / "full", supervised_store, tokenizer, *RUN)
    output, _ = communicate_or_kill(process, 300)
    assert process.returncode == 0, output
    full = _metrics(tmp_path / "full")
    assert {record["task"] for record in full.values()} == {"retrieval", "clr", "classification", "sts"}
    process = _launch(tmp_path / "cut", supervised_store, tokenizer, *RUN)
    deadline = time.monotonic() + 180
    try:
        while not (_metrics(tmp_path / "cut") and max(_metrics(tmp_path / "cut")) >= 10):
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.1)  # a tighter poll competes with the run for the 2 cores
    finally:
        kill_group(process)  # the kill the test makes, and no run left behind if it fails
    stopped_at = max(_metrics(tmp_path / "cut"))
    assert stopped_at < 20
    process = _launch(tmp_path / "cut", supervised_store, tokenizer, *RUN)
    output, _ = communicate_or_kill(process, 300)
    assert process.returncode == 0, output
    resumed = _metrics(tmp_path / "cut")
    for step in range(1, 21):
        assert resumed[step]["loss"] == full[step]["loss"], step
        assert resumed[step]["task"] == full[step]["task"], step
        assert resumed[step].get("dhnm_replacements") == full[step].get("dhnm_replacements"), step
    a = _dhnm_state(str(tmp_path / "full" / "checkpoints"), supervised_store)
    b = _dhnm_state(str(tmp_path / "cut" / "checkpoints"), supervised_store)
    for key in a:
        numpy.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_unknown_task_weight_is_one_clear_error(tmp_path):
    env = dict(os.environ)
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, "-m", "megatron_conan.training.embed_sup", "--config", TINY,
                             "--dry-run", "embedding.task_weights={retrieval: 1, retreival: 2}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "retreival" in result.stderr, result.stderr


BEFORE_REDESIGN = os.path.join(REPO, "tests", "checkpoint", "fixtures", "embed_sup_e88d666")


def test_a_checkpoint_without_the_loader_position_is_refused_in_one_line(embedding_data, supervised_store, tmp_path):
    """The committed stage-4 checkpoint of e88d666 (its README) kept the loader's position inside the
    stage's state, where no released code read it; today the Trainer saves it beside that. Resuming
    from it is refused with one line and exit 2, not started at the first batch in silence."""
    with open(os.path.join(BEFORE_REDESIGN, "expected.json"), encoding="utf-8") as handle:
        expected = json.load(handle)
    shutil.copytree(os.path.join(BEFORE_REDESIGN, "checkpoints"), tmp_path / "checkpoints")
    process = _launch(tmp_path, supervised_store, embedding_data["tokenizer"], *expected["overrides"])
    output, _ = communicate_or_kill(process, 300)
    assert process.returncode == 2, output
    lines = [line for line in output.splitlines() if "no data-loader position" in line]
    assert len(lines) == 1 and "checkpoint.load_dir" in lines[0], output
    assert not _metrics(tmp_path), "a step ran"
