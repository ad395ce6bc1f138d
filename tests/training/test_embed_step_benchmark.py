import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_embed_step_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/embed_step.py", "--batch", "8", "--query-length", "8", "--passage-length", "16",
         "--mini-batch-size", "4", "--steps", "1", "--rounds", "1", "--warmup", "1", "--output-json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pairs/s" in result.stdout and "CachedMNRL" in result.stdout
    rows = json.loads(out.read_text())
    assert [row["mode"] for row in rows] == ["plain", "cached"]
    assert all(row["ours_pairs_per_s"] > 0 and row["theirs_pairs_per_s"] > 0 for row in rows)


def test_dhnm_overhead_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "row.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/dhnm_overhead.py", "--examples", "40", "--steps", "1", "--rounds", "1",
         "--output-json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    row = json.loads(out.read_text())
    assert row["samples_per_s_on"] > 0 and row["samples_per_s_off"] > 0 and "overhead" in result.stdout
