import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_step_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--steps", "2", "--warmup", "1", "--output-json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens/s" in result.stdout and "MFU" in result.stdout
    import json

    rows = json.loads(out.read_text())
    assert {row["recompute"] for row in rows} == {"none", "full"}
    assert all(row["tokens_per_s"] > 0 for row in rows)
