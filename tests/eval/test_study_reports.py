"""The studies' bookkeeping: seconds and tokens read back from a run's metrics.jsonl, and the tables
of benchmarks/learning_vs_st.py and benchmarks/quality_vs_compute.py (the runs themselves are minutes
to hours; docs/PERFORMANCE.md and docs/LEARNING.md name their commands)."""

import argparse
import json
import os

import pytest

from benchmarks import learning_vs_st, quality_vs_compute
from megatron_conan.jobs.plan import PLANS


def _metrics(path, steps):
    """Steps of 64 samples taking 2 s each (32 samples/s) and 1,000 tokens each."""
    with open(path, "w", encoding="utf-8") as handle:
        for step in range(1, steps + 1):
            handle.write(json.dumps({"step": step, "consumed_samples": 64 * step, "samples_per_s": 32.0,
                                     "tokens_per_s": 500.0}) + "\n")


def test_step_seconds_and_tokens_come_from_metrics(tmp_path):
    _metrics(tmp_path / "metrics.jsonl", 10)
    assert learning_vs_st.step_seconds(str(tmp_path)) == pytest.approx(20.0)
    assert quality_vs_compute.trained_tokens(str(tmp_path)) == 10_000
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as handle:  # resumed from step 5
        for step in range(6, 11):
            handle.write(json.dumps({"step": step, "consumed_samples": 64 * step, "samples_per_s": 32.0,
                                     "tokens_per_s": 500.0}) + "\n")
    assert quality_vs_compute.trained_tokens(str(tmp_path)) == 10_000  # the last line of a step wins


def test_learning_vs_st_table_gives_both_sides_and_the_ratio():
    args = argparse.Namespace(steps=420, batch=64, lr=1e-3, temperature=0.05, clip_grad=10.0, mini_batch_size=0,
                              plan=PLANS["full"], seeds=[1])
    run = {"seed": 1, "ndcg_at_10": 0.2, "threads": 2, "train_s": 200.0, "pairs_per_s": 134.4, "loop_s": 180.0,
           "loop_pairs_per_s": 149.3, "cpu_s": 390.0}
    theirs = {**run, "train_s": 300.0, "pairs_per_s": 89.6, "loop_s": 290.0, "loop_pairs_per_s": 92.7}
    table = learning_vs_st.format_results({"ours, soft mask": [run], "sentence-transformers MNRL": [theirs]}, args)
    assert "| ours, soft mask | 0.2000 +- 0.0000 | 0.2000 | 2 | 200 | 134.4 | 180 | 149.3 | 390 |" in table
    assert "ours packed in rows of 128 tokens" in table
    assert "1.50x end to end, 1.61x in steps" in table


def test_quality_vs_compute_table_reports_test_once():
    budgets = [{"multiplier": m, "weak_steps": 420 * m, "sup_steps": 80 * m, "flops": 1e15 * m,
                "validation": {"embed-weak": 0.2 * m, "embed-sup": 0.21 * m}, "bm25_validation": 0.45}
               for m in (0.25, 1, 4)]
    table = quality_vs_compute.format_table(budgets, {"multiplier": 4, "stage": "embed-sup",
                                                      "test_ndcg_at_10": 0.3, "bm25_test_ndcg_at_10": 0.449})
    assert table.count("| 0.25x |") == 1 and "| 4x | 1680 / 320 |" in table
    assert table.count("Test") == 1 and "at 4x (embed-sup): nDCG@10 0.3000 (BM25 0.4490)" in table


def _checkpoint_at(run_dir, step):
    from megatron_conan.checkpoint.layout import LATEST, checkpoint_name

    checkpoints = run_dir / "checkpoints"
    (checkpoints / checkpoint_name(step)).mkdir(parents=True)
    (checkpoints / LATEST).write_text(checkpoint_name(step))


class _RecordingPipeline:
    def __init__(self, work_dir):
        self.work_dir, self.calls = str(work_dir), []
        self.plan = argparse.Namespace(weak_steps=1000, sup_steps=200)

    def path(self, *parts):
        return os.path.join(self.work_dir, *parts)

    def __getattr__(self, name):
        if name in ("embed_weak", "mine", "embed_sup"):
            return lambda: self.calls.append(name)
        raise AttributeError(name)


@pytest.mark.parametrize("weak, sup, expected", [
    (None, None, ["embed_weak", "mine", "embed_sup"]),  # a new budget
    (500, None, ["embed_weak", "mine", "embed_sup"]),  # stopped in stage 3: continue, then mine
    (1000, None, ["mine", "embed_sup"]),  # stopped while mining or before stage 4 saved: mine again
    (1000, 100, ["embed_sup"]),  # stopped in stage 4: its mined store stays, continue it
    (1000, 200, []),  # finished: scored, not re-trained
])
def test_a_stopped_budget_continues_where_it_left_off(tmp_path, weak, sup, expected):
    pipeline = _RecordingPipeline(tmp_path)
    for stage, step in (("embed-weak", weak), ("embed-sup", sup)):
        if step:
            _checkpoint_at(tmp_path / stage, step)
    quality_vs_compute._train_budget(pipeline, 16)
    assert pipeline.calls == expected
