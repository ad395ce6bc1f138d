"""The README's first command keeps working: the whole pipeline (quick plan: every step, tiny sizes),
from any working directory, leaves every artefact, and the exported model loads with
sentence-transformers offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_conan.training.stage_registry import STAGES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    work = tmp_path / "qs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RANK", None)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_conan.quickstart", "--work-dir", str(work), "--plan", "quick"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,  # not the repository root
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(steps) == 11 and steps[-1].startswith("[11/11] report"), result.stdout
    assert "| 4 embed-sup |" in result.stdout and "| BM25 |" in result.stdout
    # a clean console: known-harmless warnings, chatty third-party loggers and transformers' bars are
    # quieted at their source (progress bars of our own steps are fine)
    console = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
    noise = ("Warning", "Building index", "Loading weights", "Writing model shards", "Traceback")
    assert not [line for line in console if any(word in line for word in noise)], console
    for name in ("corpus/manifest.json", "corpus/heldout/qrels/test.tsv", "corpus/heldout/qrels/validation.tsv",
                 "tokenizer/pydoc.model",
                 "indexed/docstrings.idx", "indexed/sft.idx", "indexed/pairs.idx", "indexed/supervised.idx",
                 "corpus/retrieval_mined.jsonl", "report.md", "results.json",
                 "plots/loss.png", "plots/soft_mask.png", "plots/dhnm.png", "plots/ndcg_by_stage.png",
                 "plots/matryoshka.png", "export/conan-pydoc/modules.json"):
        assert (work / name).exists(), name
    for stage in ("random_init", "pretrain", "sft", "embed-weak", "embed-sup"):
        assert (work / stage / "checkpoints" / "latest").exists(), stage
    results = json.loads((work / "results.json").read_text())
    assert set(results["stages"]) == set(STAGES)  # the stage ids, spelled as everywhere else
    assert set(STAGES) <= set(results["timings"])
    rows = {row["name"]: row["splits"] for row in results["evaluation"]["rows"]}
    assert set(rows["4 embed-sup"]) == {"validation", "test"}
    # the export and its checkpoint embed alike, on both splits
    for split in ("validation", "test"):
        assert abs(rows["4 embed-sup"][split]["ndcg_at_10"] - rows["4 embed-sup, exported"][split]["ndcg_at_10"]) < 1e-3
    # it learns: even the quick plan's final model beats its own untrained weights on validation
    final, untrained = rows["4 embed-sup"]["validation"], rows["0 random init (mean-pooled)"]["validation"]
    assert final["ndcg_at_10"] > untrained["ndcg_at_10"], (final, untrained)
    probe = ("from sentence_transformers import SentenceTransformer; import sys; "
             "m = SentenceTransformer(sys.argv[1]); "
             "e = m.encode(['Return the absolute value of a number.'], prompt_name='query'); print(e.shape)")
    loaded = subprocess.run([sys.executable, "-c", probe, str(work / "export" / "conan-pydoc")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "(1, 64)"
