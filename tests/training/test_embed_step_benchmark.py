import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_embed_step_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/embed_step.py", "--data", "synthetic", "--batch", "8", "--batches", "2",
         "--query-length", "8", "--min-passage-length", "4", "--passage-length", "24", "--packing",
         "--max-tokens-per-row", "32", "--mini-batch-size", "4", "--steps", "1", "--rounds", "1", "--warmup", "1",
         "--output-json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pairs/s" in result.stdout and "CachedMNRL" in result.stdout and "padding share" in result.stdout
    rows = json.loads(out.read_text())
    assert [(row["mode"], row["layout"]) for row in rows] == [
        ("plain", "padded"), ("plain", "packed"), ("cached", "padded"), ("cached", "packed")]
    assert all(row["ours_pairs_per_s"] > 0 and row["theirs_pairs_per_s"] > 0 for row in rows)
    # passages of 4-24 tokens padded to the longest waste positions; rows of 32 hold several texts
    assert all(0 < row["padding_share"] < 1 for row in rows)
    assert all(row["collectives_per_step"].get("all_reduce", 0) > 0 for row in rows)


def _dhnm_benchmark(tmp_path, name, *thresholds):
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/dhnm_overhead.py", "--examples", "40", "--steps", "1", "--rounds", "1",
         "--output-json", str(out), *thresholds],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "overhead" in result.stdout and "replacements" in result.stdout
    return json.loads(out.read_text())


def test_dhnm_overhead_benchmark_times_a_dhnm_that_decides(tmp_path):
    """The timed DHNM acts on what it observes: with S_0 < 2 always true every valid slot it scored
    is replaced (or found its pool exhausted), with thresholds no cosine can cross none is."""
    every = _dhnm_benchmark(tmp_path, "every", "--min-first-score", "2")
    never = _dhnm_benchmark(tmp_path, "never", "--min-first-score", "-2", "--max-score", "-2")
    for row in (every, never):
        assert row["samples_per_s_on"] > 0 and row["samples_per_s_off"] > 0
    # warm-up (3 steps) and one timed step with DHNM on, batch 8, K = 3: up to 96 slots
    assert 0 < every["dhnm"]["scored_slots"] <= 96 and 0 < never["dhnm"]["scored_slots"] <= 96
    assert every["dhnm"]["replacements"] > 0
    assert every["dhnm"]["replacements"] + every["dhnm"]["exhausted_now"] == every["dhnm"]["scored_slots"]
    assert never["dhnm"]["replacements"] == 0 and never["dhnm"]["exhausted_now"] == 0


def test_embed_step_benchmark_times_prefetch_on_a_main_jobs_stage_3(embedding_data, tmp_path):
    """--prefetch reads a main job's embed-weak/config.yaml (here the tiny recipe's, on the session's
    pairs) and times its Trainer step with the read-ahead thread on and off."""
    from megatron_conan.config.loader import dump_config
    from megatron_conan.config.run import load_run_config

    work = tmp_path / "work"
    (work / "embed-weak").mkdir(parents=True)
    cfg = load_run_config("embed-weak", str(REPO / "examples" / "tiny" / "embed_weak.yaml"),
                          [f"data.tokenizer={embedding_data['tokenizer']}",
                           f"data.contrastive_prefix={embedding_data['pairs']}"])
    dump_config(cfg, str(work / "embed-weak" / "config.yaml"))
    out = tmp_path / "prefetch.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/embed_step.py", "--data", "quickstart", "--work-dir", str(work), "--prefetch",
         "--steps", "2", "--rounds", "1", "--warmup", "1", "--output-json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prefetch on" in result.stdout and "prefetch off" in result.stdout
    row = json.loads(out.read_text())
    assert row["on_pairs_per_s"] > 0 and row["off_pairs_per_s"] > 0 and len(row["ratios"]) == 1
    assert row["pairs_per_step"] == 8 and row["packing"] is True
    refused = subprocess.run([sys.executable, "benchmarks/embed_step.py", "--prefetch"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--data quickstart" in refused.stderr
