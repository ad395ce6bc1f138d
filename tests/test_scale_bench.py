"""The scale benchmark (benchmarks/scale.py): growth fits, the node verdicts, and a quick end-to-end run
of one step that writes its JSON and plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scale import GIB, at_node, extrapolate, fit_exponent, format_report, marginal_bytes, summarise

REPO = Path(__file__).resolve().parents[1]


def test_exponents_come_from_the_two_largest_sizes():
    sizes = [10, 100, 1_000, 10_000]
    assert fit_exponent(sizes, [5.0, 6.0, 50.0, 500.0]) == pytest.approx(1.0)  # the fixed cost at 10 is left out
    assert fit_exponent(sizes, [1, 4, 400, 40_000]) == pytest.approx(2.0)
    assert fit_exponent(sizes, [0, 0, 0, 3]) is None
    assert extrapolate(10_000, 2.0, 1.0, 1e7) == pytest.approx(2_000.0)
    # memory: a fixed 100 MB share and 12 bytes a unit -> 12 bytes a unit, whatever the share
    assert marginal_bytes(sizes, [100e6 + 12 * size for size in sizes]) == pytest.approx(12.0)


def _runs(name, seconds, delta, baseline=1 << 30):
    sizes = [300, 3_000, 30_000, 300_000]
    return [{"step": name, "size": size, "seconds": s, "peak_rss_delta": d, "baseline_rss": baseline,
             "output_bytes": 0} for size, s, d in zip(sizes, seconds, delta)]


def test_verdicts_flag_memory_past_a_node_and_super_linear_time():
    linear = _runs("contrastive_open", [0.1, 1, 10, 100], [1 << 20, 10 << 20, 100 << 20, 1000 << 20])
    node = at_node("contrastive_open", summarise("contrastive_open", linear), linear)
    # 3,000 bytes a pair (900 MiB more from 3e4 to 3e5 pairs) -> 1.7e9 pairs: 4.6 TiB a rank, 8 ranks a node
    summary = summarise("contrastive_open", linear)
    assert summary["peak_rss_delta"]["bytes_per_unit"] == pytest.approx((900 << 20) / 270_000)
    assert node["verdict"].startswith("DEFECT: memory") and node["memory_bytes"] > 256 * GIB
    quadratic = _runs("mining_exact_queries", [0.01, 1, 100, 10_000], [0, 0, 0, 0])
    node = at_node("mining_exact_queries", summarise("mining_exact_queries", quadratic), quadratic)
    assert "time grows as size^2.00" in node["verdict"] and node["memory_flat"]
    flat = _runs("dhnm", [1, 1, 1, 1], [1 << 20] * 4)
    assert at_node("dhnm", summarise("dhnm", flat), flat)["verdict"] == "fits"


@pytest.mark.slow
def test_quick_run_writes_json_plots_and_the_table(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--quick", "--steps", "dhnm",
                           "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "scale.json").read_text())
    for name in ("dhnm",):
        entry = results["steps"][name]
        assert [run["size"] for run in entry["runs"]] == [20, 60, 180, 540]
        assert all(run["seconds"] > 0 and run["peak_rss"] >= run["baseline_rss"] for run in entry["runs"])
        assert entry["seconds"]["exponent"] is not None and (tmp_path / f"{name}.png").stat().st_size > 0
    # every example's state is saved: the shard grows with the examples
    assert results["steps"]["dhnm"]["output_bytes"]["exponent"] > 0.8
    assert "| dhnm | examples | 20 - 540 |" in done.stdout
    assert format_report(results).count("\n") == 2
