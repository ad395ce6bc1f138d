"""Checkpoints written by earlier code still load: the committed run directory in
``fixtures/run_0_1_0`` (see its README) is read, resolved and resumed."""

import json
import os
import shutil

from megatron_conan.checkpoint.metadata import read_checkpoint_info
from megatron_conan.testing.distributed import run_distributed
from tests.training.test_loop import _config, _train_body

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run_0_1_0")


def _expected():
    with open(os.path.join(FIXTURE, "expected.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_the_old_run_directory_resolves_to_its_latest_checkpoint():
    info = read_checkpoint_info(FIXTURE)
    assert os.path.basename(info.path) == "iter_0000002" and info.step == 2
    assert (info.model_config.num_layers, info.model_config.hidden_size, info.model_config.vocab_size) == (2, 32, 128)
    assert info.run_config["train"]["train_steps"] == 4


def test_a_run_resumes_from_the_old_checkpoint_and_reproduces_the_losses(tmp_path):
    expected = _expected()
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), tmp_path / "checkpoints")
    resumed = run_distributed(_train_body, 1, args=(_config(tmp_path, *expected["overrides"]),))[0]
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert abs(resumed["losses"][step] - expected["losses"][str(step)]) < 1e-6, (step, resumed, expected)
