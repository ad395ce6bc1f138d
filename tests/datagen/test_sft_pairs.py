"""SFT -> pairs: the query/positive mapping, located bad lines, the teacher filter (counted drops,
exactly the pairs below the threshold), bad teacher directories, atomic output."""

import json
import os

import numpy
import pytest

from megatron_conan.cli import sft_to_pairs as sft_to_pairs_command
from megatron_conan.data.jsonl import BadLineKind
from megatron_conan.datagen import synthetic
from megatron_conan.datagen.sft_pairs import SFTPairsConfig, sft_record_to_pair, sft_to_pairs
from megatron_conan.errors import DataError

for _switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_switch, "1")  # the teacher is a local directory: nothing is downloaded


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from megatron_conan.testing.tiny_models import build_tiny_sentence_transformer

    return build_tiny_sentence_transformer(tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    synthetic.write_sft_jsonl(str(path), num_examples=60, seed=2)
    with open(path, "a", encoding="utf-8") as out:
        out.write("{not json\n")
        out.write(json.dumps({"instruction": "Explain the with statement."}) + "\n")
        out.write(json.dumps({"instruction": " ", "output": "x"}) + "\n")
        out.write("\n")
    return path


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_query_is_instruction_and_input():
    assert sft_record_to_pair({"instruction": "Answer.", "input": "What is a dict?",
                               "output": "A mapping."}) == ("Answer.\nWhat is a dict?", "A mapping.")
    assert sft_record_to_pair({"instruction": "Answer.", "input": "", "output": "Yes."}) == (
        "Answer.", "Yes.")
    assert sft_record_to_pair({"instruction": "Answer.", "output": "Yes."}) == ("Answer.", "Yes.")


def test_conversion_counts_and_locates_bad_lines(sft_jsonl, tmp_path):
    output = tmp_path / "pairs.jsonl"
    report = sft_to_pairs(SFTPairsConfig([str(sft_jsonl)], str(output), progress=False))
    sources = [json.loads(line) for line in open(sft_jsonl, encoding="utf-8").readlines()[:60]]
    pairs = _read(output)
    assert report.pairs == len(pairs) == 60 and report.lines == 64 and report.dropped == 0
    for source, pair in zip(sources, pairs):
        query, positive = sft_record_to_pair(source)
        assert pair == {"task": "pair", "query": query, "positive": positive}
    counts = {kind: report.bad_lines.count(kind) for kind in BadLineKind}
    assert counts[BadLineKind.MALFORMED_JSON] == counts[BadLineKind.MISSING_FIELD] == 1
    assert counts[BadLineKind.EMPTY_TEXT] == counts[BadLineKind.BLANK_LINE] == 1
    assert report.bad_lines.examples[BadLineKind.MISSING_FIELD][0].line_number == 62
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_teacher_filter_drops_exactly_the_low_pairs(sft_jsonl, teacher, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(teacher, device="cpu", local_files_only=True)
    sources = [json.loads(line) for line in open(sft_jsonl, encoding="utf-8").readlines()[:60]]
    pairs = [sft_record_to_pair(source) for source in sources]
    embeddings = model.encode([q for q, _ in pairs] + [p for _, p in pairs],
                              normalize_embeddings=True)
    scores = (embeddings[:60] * embeddings[60:]).sum(axis=1)
    threshold = float(numpy.median(scores))
    output = tmp_path / "kept.jsonl"
    tool = sft_to_pairs_command
    assert tool.main(["--input", str(sft_jsonl), "--output", str(output), "--teacher", teacher,
                      "--min-score", str(threshold), "--no-progress", "--report-json",
                      str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    kept = [pair for pair, score in zip(pairs, scores) if score >= threshold]
    assert [(row["query"], row["positive"]) for row in _read(output)] == kept
    assert report["dropped_by_teacher"] == 60 - len(kept) > 0
    assert report["pairs"] == len(kept)
    first_dropped = next(index for index, score in enumerate(scores) if score < threshold)
    assert report["dropped_examples"][0].startswith(f"{sft_jsonl}:{first_dropped + 1} (")


def test_bad_teacher_is_one_line_and_writes_nothing(sft_jsonl, tmp_path, capsys):
    tool = sft_to_pairs_command
    output = tmp_path / "pairs.jsonl"
    not_a_model = tmp_path / "plain"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    for teacher, message in ((tmp_path / "missing", "does not exist"),
                             (not_a_model, "not a sentence-transformers model directory")):
        assert tool.main(["--input", str(sft_jsonl), "--output", str(output), "--teacher",
                          str(teacher), "--no-progress"]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1 and "Traceback" not in error
    assert not output.exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{}\n")
    with pytest.raises(DataError, match="no pairs to write"):
        sft_to_pairs(SFTPairsConfig([str(empty)], str(output), progress=False))
    assert not list(tmp_path.glob("pairs.jsonl*"))
