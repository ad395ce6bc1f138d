"""Issue 18 items 1 and 4: the quickstart replaces only a work directory it made, and on a host with
fewer GPUs than a stage's ranks runs that stage on one GPU with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_conan.jobs.training_steps import layout_for_host
from megatron_conan.jobs.workspace import WORK_DIR_MARKER, claim_work_dir, stage_dir

REPO = Path(__file__).resolve().parents[1]


def test_a_users_file_in_the_work_dir_stops_the_run_with_one_line(tmp_path):
    work = tmp_path / "runs"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, "-m", "megatron_conan.quickstart", "--work-dir", str(work),
                             "--plan", "quick"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quickstart: error: --work-dir "), result.stderr
    assert "did not make" in lines[0]
    assert result.stdout == ""
    assert sorted(os.listdir(work)) == ["thesis.tex"] and (work / "thesis.tex").read_text() == "years of work"


def test_own_empty_and_missing_work_dirs_are_used(tmp_path):
    made = tmp_path / "new" / "qs"
    assert claim_work_dir(str(made)) is None and (made / WORK_DIR_MARKER).is_file()
    (made / "pretrain").mkdir()  # an interrupted run: its marker is there, so it is replaced
    assert claim_work_dir(str(made)) is None
    assert sorted(os.listdir(made)) == [WORK_DIR_MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_work_dir(str(empty)) is None and (empty / WORK_DIR_MARKER).is_file()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is not a directory" in claim_work_dir(str(a_file)) and a_file.read_text() == "x"


def test_a_plan_is_fitted_to_the_gpus_present():
    pretrain = {"parallel": {"tensor_parallel": 2}, "train": {"global_batch_size": 8, "micro_batch_size": 4}}
    assert layout_for_host(2, pretrain, gpus=0) == (2, pretrain)  # CPU ranks over gloo, as planned
    assert layout_for_host(2, pretrain, gpus=2) == (2, pretrain)  # NCCL, a GPU per rank
    world, fitted = layout_for_host(2, pretrain, gpus=1)
    assert world == 1 and fitted["parallel"] == {"tensor_parallel": 1, "pipeline_parallel": 1}
    assert fitted["train"] == pretrain["train"] and pretrain["parallel"] == {"tensor_parallel": 2}
    sup = {"train": {"global_batch_size": 8}, "embedding": {"task_batch_sizes": {"retrieval": 4, "sts": 8}}}
    world, fitted = layout_for_host(2, sup, gpus=1)  # DP 2 -> 1: per-rank task batches double
    assert world == 1 and fitted["embedding"]["task_batch_sizes"] == {"retrieval": 8, "sts": 16}


def test_plan_settings_change_fields_and_merge_model_and_corpus():
    from megatron_conan.jobs.plan import PLANS, plan_with

    plan = plan_with(PLANS["full"], ["weak_steps=360", "model.embedding_init_method_std=0.02", "temperature=0.02"])
    assert (plan.weak_steps, plan.temperature) == (360, 0.02)
    assert plan.model == {**PLANS["full"].model, "embedding_init_method_std": 0.02}
    assert PLANS["full"].weak_steps != 360 and PLANS["full"].model["embedding_init_method_std"] != 0.02


@pytest.mark.parametrize("setting", ["weak_steps", "no_such_field=1", "seed.x=1"])
def test_a_bad_plan_setting_is_one_line_and_exit_2(setting, tmp_path, capsys):
    from megatron_conan.quickstart import main

    assert main(["--work-dir", str(tmp_path / "run"), "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quickstart: error: --set") and not (tmp_path / "run").exists()


def test_stage_dirs_are_stage_ids_and_older_work_dirs_still_read(tmp_path):
    assert stage_dir(str(tmp_path), "embed-weak") == str(tmp_path / "embed-weak")  # nothing there yet
    (tmp_path / "embed_sup").mkdir()  # a work dir made before the ids were spelled one way
    assert stage_dir(str(tmp_path), "embed-sup") == str(tmp_path / "embed_sup")
    (tmp_path / "embed-sup").mkdir()
    assert stage_dir(str(tmp_path), "embed-sup") == str(tmp_path / "embed-sup")
