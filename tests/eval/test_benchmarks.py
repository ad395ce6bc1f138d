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
                            "--batch-size", "4", "--max-length", "64", "--packing", "--max-tokens-per-row", "48"],
                           tmp_path)
    # padded and packed rows give sentence-transformers' vectors
    assert set(figures["minimum_cosine"]) == {"ours", "ours packed"}
    assert all(cosine > 0.99999 for cosine in figures["minimum_cosine"].values())
    assert all(figures["texts_per_s"][name]["wall"] > 0 for name in ("ours", "ours packed", "theirs"))
    assert 0 <= figures["padding_share"]["packed"] < 1 and 0 <= figures["padding_share"]["padded"] < 1
    assert "ratio" in stdout and "padding share" in stdout


def test_mining_benchmark_finds_the_same_negatives(artifacts, tmp_path):
    figures, stdout = _run(["benchmarks/mine_hard_negatives.py", "--export", artifacts["sentence_transformer"],
                            "--pairs", "40", "--num-negatives", "3", "--skip-top", "2", "--batch-size", "8"], tmp_path)
    assert figures["agreement"]["pairs_compared"] == figures["pairs"] == 40
    # same model, prompts and rules on both sides: only exact score ties could order differently
    assert figures["agreement"]["mean_jaccard"] > 0.95
    assert figures["ours_queries_per_s"] > 0 and figures["theirs_queries_per_s"] > 0
