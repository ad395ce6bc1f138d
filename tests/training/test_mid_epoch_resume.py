"""Mid-epoch resume of the embedding stages (issue 32): the Trainer checkpoints its loader's position
(``extra["loader"]``, the next batch the step takes, whatever the read-ahead thread had prepared), so
a run stopped half-way through a task epoch and resumed in a fresh world continues exactly as the
uninterrupted run: every step's losses, task and DHNM counters, and the final DHNM state.

Stage 3 (embed-weak, packed rows) and stage 4 (embed-sup, DHNM on with thresholds that act on a
barely trained model, retrieval drawn often enough to come back to examples whose slots DHNM moved)
on the tiny recipes and the session's stores; one spawned world trains the uninterrupted runs and
the first halves, a second one resumes the halves (a new process: nothing survives but the files).
The resumed stage-3 half reads without the thread (``train.prefetch=false``): the position is the
same either way."""

import dataclasses
import os

import numpy
import pytest
import torch

from megatron_conan.checkpoint.layout import COMMON_FILE, read_latest
from megatron_conan.testing.distributed import run_distributed
from tests.golden import goldens
from tests.training.conftest import read_metrics
from tests.training.test_embed_sup import _dhnm_state

WEAK = goldens.GoldenRun("weak", "embed-weak", ("train.train_steps=8",), data=goldens.PAIRS)
SUP = goldens.GoldenRun("sup", "embed-sup", (
    "train.train_steps=16", goldens.ACTIVE_DHNM,
    "embedding.task_weights={retrieval: 3, clr: 1, classification: 1, sts: 1}",
    "embedding.task_batch_sizes={retrieval: 8, clr: 4, classification: 4, sts: 8}"), data=goldens.SUPERVISED)


def _half(run: goldens.GoldenRun, resumed_overrides=()):
    """(the run's first half, stopped by train.exit_after_steps, and its resumption): one run_dir."""
    steps = int(run.overrides[0].split("=")[1])
    cut = dataclasses.replace(run, name=run.name + "_cut",
                              overrides=run.overrides + (f"train.exit_after_steps={steps // 2}",))
    return cut, dataclasses.replace(cut, overrides=run.overrides + tuple(resumed_overrides))


def _loader_position(run_dir):
    common = torch.load(os.path.join(read_latest(os.path.join(run_dir, "checkpoints")), COMMON_FILE),
                        weights_only=False)
    return common["extra"]["loader"]


def _compared(record):
    return {name: value for name, value in record.items()
            if name == "task" or name.startswith("loss") or name.startswith("dhnm_")}


@pytest.mark.slow
def test_stages_3_and_4_resume_mid_epoch_exactly(embedding_data, supervised_store, tmp_path):
    data = {"tokenizer": embedding_data["tokenizer"], "pairs": embedding_data["pairs"], "supervised": supervised_store}
    weak_cut, weak_resumed = _half(WEAK, ("train.prefetch=false",))
    sup_cut, sup_resumed = _half(SUP)
    run_distributed(goldens.run_in_world, 1, args=([WEAK, weak_cut, SUP, sup_cut], data, str(tmp_path)))
    halves = {run.name: read_metrics(tmp_path / run.name) for run in (weak_cut, sup_cut)}
    assert sorted(halves["weak_cut"]) == [1, 2, 3, 4] and sorted(halves["sup_cut"]) == list(range(1, 9))
    weak_position = _loader_position(tmp_path / "weak_cut")
    assert weak_position["step"] == 4 and 0 < weak_position["tasks"]["pair"]["cursor"], weak_position
    sup_position = _loader_position(tmp_path / "sup_cut")
    assert sup_position["step"] == 8 and 0 < sup_position["tasks"]["clr"]["cursor"], sup_position
    # the second half draws retrieval examples again, with the slots DHNM moved in the first
    assert sup_position["tasks"]["retrieval"]["epoch"] >= 1, sup_position
    run_distributed(goldens.run_in_world, 1, args=([weak_resumed, sup_resumed], data, str(tmp_path)))
    for full, resumed, steps in (("weak", "weak_cut", 8), ("sup", "sup_cut", 16)):
        expected, got = read_metrics(tmp_path / full), read_metrics(tmp_path / resumed)
        assert sorted(expected) == sorted(got) == list(range(1, steps + 1))
        for step in expected:
            assert _compared(got[step]) == _compared(expected[step]), (resumed, step)
    resumed_half = [read_metrics(tmp_path / "sup")[step] for step in range(9, 17)]
    assert sum(record.get("dhnm_replacements", 0) for record in resumed_half) > 0, "DHNM idle: a vacuous test"
    full_state = _dhnm_state(str(tmp_path / "sup" / "checkpoints"), supervised_store)
    resumed_state = _dhnm_state(str(tmp_path / "sup_cut" / "checkpoints"), supervised_store)
    for key in full_state:
        numpy.testing.assert_array_equal(full_state[key], resumed_state[key], err_msg=key)
