import json

import pytest


@pytest.mark.slow
def test_benchmark_runs_at_tiny_size(tmp_path, scripts, capsys):
    """Real text (Python's docs, each text once), every candidate as a process, outputs compared
    byte for byte."""
    benchmark = scripts("benchmarks/preprocess_throughput.py")
    out = tmp_path / "result.json"
    assert benchmark.main([
        "--once", "--vocab-size", "1000", "--tokenizer-sentences", "3000", "--workers",
        "2", "--rounds", "1", "--startup-runs", "1", "--stress-mb", "1", "--workdir",
        str(tmp_path / "work"), "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sentencepiece threads" in printed and "per round" in printed
    result = json.loads(out.read_text())
    assert result["corpus"] == "pydoc once" and result["size_mb"] > 0.5
    runs = result["runs"]
    assert set(runs) == {"loop", "sentencepiece threads", "preprocess_data --workers 2",
                         "preprocess_data --workers 2 --no-word-cache"}
    assert all(run["identical"] for run in runs.values())
    assert len({run["tokens"] for run in runs.values()}) == 1
    assert result["startup_seconds"]["preprocess_data"] > 0
    assert set(result["median_ratios"]) == {
        "loop", "sentencepiece threads", "preprocess_data --workers 2 --no-word-cache",
        "first pass, encoding only: cache vs plain"}
    peaks = result["peak_rss"]
    assert len(peaks) == 5 and all(peak["largest_worker_mib"] > 0 for peak in peaks.values())
