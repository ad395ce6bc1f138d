"""The golden per-step losses (tests/golden/): fresh runs of every stage at seed 0 on the tiny recipes
reproduce the recorded losses (and stage 4's tasks and DHNM replacements) within each run's
tolerance, bit-identical (tolerance 0) for every run unless its golden file says otherwise.

The goldens were recorded through the entry points (``python -m tests.golden.goldens --write``);
here the runs of one world size share one spawned world, one after another, on the suite's session
stores (built by the same functions as the script's), which is what makes the check affordable."""

import pytest

from megatron_conan.testing.distributed import run_distributed
from tests.golden import goldens


def _check(embedding_data, supervised_store, tmp_path, ranks):
    data = {"tokenizer": embedding_data["tokenizer"], "pairs": embedding_data["pairs"],
            "supervised": supervised_store}
    if any(run.stage == "sft" for run in goldens.RUNS if run.ranks == ranks):
        data["sft"] = goldens.build_sft(tmp_path, embedding_data["tokenizer"])
    runs = [run for run in goldens.RUNS if run.ranks == ranks]
    results = run_distributed(goldens.run_in_world, ranks, args=(runs, data, str(tmp_path)))[0]
    problems = {run.name: goldens.differences(run, results[run.name], goldens.load_golden(run)) for run in runs}
    assert not any(problems.values()), problems


@pytest.mark.slow
def test_single_process_runs_of_every_stage_match_their_goldens(embedding_data, supervised_store, tmp_path):
    _check(embedding_data, supervised_store, tmp_path, ranks=1)


@pytest.mark.slow
def test_two_rank_gradcache_runs_match_their_goldens(embedding_data, supervised_store, tmp_path):
    _check(embedding_data, supervised_store, tmp_path, ranks=2)


def test_a_changed_loss_is_reported():
    """The comparison itself: an ulp off fails a bit-identical run, a missing step or task is named."""
    run = goldens.GoldenRun("x", "embed-sup", ())
    golden = {"tolerance": 0.0, "steps": {"1": {"loss": 1.5, "task": "sts"}, "2": {"loss": 2.0, "task": "clr"}}}
    assert goldens.differences(run, {"1": {"loss": 1.5, "task": "sts"}, "2": {"loss": 2.0, "task": "clr"}},
                               golden) == []
    off = goldens.differences(run, {"1": {"loss": 1.5000000000000002, "task": "sts"}, "2": {"loss": 2.0,
                                                                                             "task": "retrieval"}},
                              golden)
    assert len(off) == 2 and "step 1 loss" in off[0] and "step 2 task" in off[1], off
    assert goldens.differences(run, {"1": {"loss": 1.5, "task": "sts"}}, golden)[0].startswith("steps")
    assert goldens.differences(run, {"1": {"loss": 1.5 + 1e-7, "task": "sts"}, "2": {"loss": 2.0, "task": "clr"}},
                               {**golden, "tolerance": 1e-6}) == []
