import json


def test_benchmark_runs_at_tiny_size(tmp_path, scripts, capsys):
    benchmark = scripts("benchmarks/preprocess_throughput.py")
    out = tmp_path / "result.json"
    assert benchmark.main(["--size-mb", "1", "--vocab-size", "1000", "--tokenizer-sentences",
                           "3000", "--workers", "1", "2", "--repeats", "1", "--workdir", str(tmp_path / "work"),
                           "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "plain loop" in printed and "--workers 2" in printed
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"plain loop", "preprocess_data --workers 1",
                         "preprocess_data --workers 2"}
    assert all(run.get("identical_to_plain", True) for run in runs.values())
    assert len({run["tokens"] for run in runs.values()}) == 1
