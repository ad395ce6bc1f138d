"""The encoding and mining benchmarks run end to end on the session's tiny checkpoint and export, and
their two sides compute the same thing (the ratios themselves are figures, not assertions)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args, tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, *args, "--rounds", "1", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout


def test_encode_benchmark_compares_equal_vectors(artifacts, tmp_path):
    figures, stdout = _run(["benchmarks/encode_throughput.py", "--checkpoint", artifacts["embed_checkpoint"],
                            "--export", artifacts["sentence_transformer"], "--texts", "24", "--chunk", "12",
                            "--batch-size", "4", "--max-length", "64"], tmp_path)
    assert figures["minimum_cosine"] > 0.99999
    assert figures["texts_per_s"]["ours"]["wall"] > 0 and figures["texts_per_s"]["theirs"]["wall"] > 0
    assert "ratio" in stdout


def test_mining_benchmark_finds_the_same_negatives(artifacts, tmp_path):
    figures, stdout = _run(["benchmarks/mine_hard_negatives.py", "--export", artifacts["sentence_transformer"],
                            "--pairs", "40", "--num-negatives", "3", "--skip-top", "2", "--batch-size", "8"], tmp_path)
    assert figures["agreement"]["pairs_compared"] == figures["pairs"] == 40
    # same model, prompts and rules on both sides: only exact score ties could order differently
    assert figures["agreement"]["mean_jaccard"] > 0.95
    assert figures["ours_queries_per_s"] > 0 and figures["theirs_queries_per_s"] > 0
