"""The corpora built from Python's documentation: determinism, the held-out split, the schemas the
project's tools read, and the manifest."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from megatron_conan.cli import preprocess as preprocess_command
from megatron_conan.cli import tokenize_contrastive as tokenize_contrastive_command
from megatron_conan.cli import train_tokenizer as train_tokenizer_command
from megatron_conan.datagen.pydoc import clean as pydoc_clean
from megatron_conan.datagen.pydoc import split as pydoc_split
from megatron_conan.datagen.pydoc import write as pydoc_write
from megatron_conan.datagen.pydoc.config import PydocCorpusConfig

TOOL = [sys.executable, "-m", "megatron_conan.cli.build_pydoc_corpus"]
# Small limits keep the tool runs below fast; the held-out split is computed over everything.
SMALL = ["max_sft_examples=300", "max_pair_examples=300", "max_retrieval_examples=200",
         "max_mining_corpus=400", "max_sts_anchors=40", "max_classification_per_label=20",
         "max_heldout_queries=150"]
TRAINING_FILES = ("pretrain.jsonl", "sft.jsonl", "pairs.jsonl", "retrieval.jsonl", "corpus.jsonl",
                  "sts.jsonl", "classification.jsonl")


def _build_command(output_dir, *overrides):
    return [*TOOL, "--output-dir", str(output_dir), *SMALL, *overrides]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The same corpus built by two processes at once under different hash seeds."""
    root = tmp_path_factory.mktemp("pydoc")
    processes = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        processes.append(subprocess.Popen(_build_command(root / f"hash{hash_seed}"), env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()
    return root / "hash1", root / "hash2"


@pytest.fixture(scope="module")
def corpus(builds):
    return builds[0]


def _files(directory):
    return sorted(os.path.relpath(os.path.join(base, name), directory)
                  for base, _, names in os.walk(directory) for name in names)


def _jsonl(path):
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def _manifest(directory):
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as stream:
        return json.load(stream)


def _normalise(text):
    return " ".join(text.split()).lower()


def test_byte_identical_across_processes_and_hash_seeds(builds):
    first, second = builds
    assert _files(first) == _files(second)
    for name in _files(first):
        with open(first / name, "rb") as a, open(second / name, "rb") as b:
            assert a.read() == b.read(), name


def test_another_seed_holds_out_other_families(corpus, tmp_path):
    manifest = pydoc_write.build_pydoc_corpus(str(tmp_path / "seed1"), PydocCorpusConfig(
        seed=1, max_sft_examples=50, max_pair_examples=50, max_retrieval_examples=50,
        max_mining_corpus=60, max_sts_anchors=5, max_classification_per_label=5))
    assert manifest["heldout_families"] != _manifest(corpus)["heldout_families"]
    assert manifest["python"] == _manifest(corpus)["python"]


def test_manifest_matches_files(corpus):
    manifest = _manifest(corpus)
    assert sorted(manifest["files"]) == [name for name in _files(corpus) if name != "manifest.json"]
    for name, info in manifest["files"].items():
        data = (corpus / name).read_bytes()
        lines = data.count(b"\n") - (1 if name.endswith(".tsv") else 0)  # the qrels header
        assert (info["lines"], info["bytes"], info["sha256"]) == (
            lines, len(data), hashlib.sha256(data).hexdigest()), name
    counts = manifest["counts"]
    assert counts["heldout_queries"] + counts["heldout_validation_queries"] == \
        manifest["files"]["heldout/queries.jsonl"]["lines"]
    assert counts["heldout_queries"] == manifest["files"]["heldout/qrels/test.tsv"]["lines"]
    assert counts["heldout_validation_queries"] == manifest["files"]["heldout/qrels/validation.tsv"]["lines"]
    assert counts["heldout_corpus"] == manifest["files"]["heldout/corpus.jsonl"]["lines"]
    assert counts["docstrings_collected"] == (
        counts["docstrings_kept"] + counts["docstrings_dropped_short"]
        + counts["docstrings_dropped_duplicate"] + counts["docstrings_dropped_address"])
    assert counts["docstrings_kept"] == counts["training_docstrings"] + counts["heldout_docstrings"]
    assert manifest["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert manifest["config"]["max_sft_examples"] == 300 and manifest["seed"] == 0


def test_modules_counted_and_side_effects_denied(corpus):
    modules = _manifest(corpus)["modules"]
    skipped = modules["skipped_reasons"]
    denied = ("antigravity", "this", "idlelib", "tkinter", "turtle")
    if sys.version_info < (3, 12):  # Python 3.12 moved unittest's own tests to test.test_unittest
        denied += ("unittest.test",)
    for name in denied:
        assert skipped[name].startswith("denied: "), name
        assert name not in modules["imported_names"]
    assert not any(part in ("__main__", "test", "tests") for name in modules["imported_names"]
                   for part in name.split("."))
    assert {"json", "os", "collections.abc", "email.mime.text"} <= set(modules["imported_names"])
    assert modules["imported"] == len(modules["imported_names"]) > 300  # 3.11: 400+, 3.12: 355
    assert modules["skipped"] == len(skipped)
    assert all(reason.startswith(("denied: ", "import failed: ")) for reason in skipped.values())


def test_heldout_is_beir_and_consistent(corpus):
    documents = _jsonl(corpus / "heldout" / "corpus.jsonl")
    queries = _jsonl(corpus / "heldout" / "queries.jsonl")
    rows_of = {}
    for split in ("validation", "test"):
        with open(corpus / "heldout" / "qrels" / f"{split}.tsv", encoding="utf-8") as stream:
            header, *rows_of[split] = [line.rstrip("\n").split("\t") for line in stream]
        assert header == ["query-id", "corpus-id", "score"]
    rows = rows_of["validation"] + rows_of["test"]
    assert all(set(document) == {"_id", "title", "text"} and document["text"] for document in documents)
    assert all(set(query) == {"_id", "text"} and query["text"] for query in queries)
    document_text = {document["_id"]: document["text"] for document in documents}
    query_text = {query["_id"]: query["text"] for query in queries}
    assert len(document_text) == len(documents) and len(query_text) == len(queries)
    assert 500 <= len(documents) <= 3000 and len(queries) == 300  # 150 per split
    assert len(rows_of["validation"]) == len(rows_of["test"]) == 150
    assert {row[0] for row in rows} == set(query_text) and len(rows) == len(query_text)
    # the two splits draw their queries from disjoint module families, recorded in the manifest
    splits = _manifest(corpus)["heldout_splits"]
    assert not set(splits["validation"]) & set(splits["test"])
    assert set(splits["validation"]) | set(splits["test"]) == set(_manifest(corpus)["heldout_families"])
    for split, split_rows in rows_of.items():
        for _, document_id, _ in split_rows:
            top = document_id.split(".")[0]
            assert pydoc_clean._FAMILIES.get(top, top) in splits[split], (split, document_id)
    for query_id, document_id, score in rows:
        assert document_id in document_text and int(score) == 1
        # The query is never a verbatim part of its document.
        assert _normalise(query_text[query_id]) not in _normalise(document_text[document_id])


def _training_strings(corpus):
    """Every string field of every training file."""
    strings = []
    for name in TRAINING_FILES:
        for row in _jsonl(corpus / name):
            for value in row.values():
                strings.extend([value] if isinstance(value, str) else
                               [item for item in value if isinstance(item, str)]
                               if isinstance(value, list) else [])
    return strings


def _word_8grams(text):
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + 8]) for i in range(len(words) - 7)}


def test_heldout_shares_no_module_and_no_text_with_training(corpus):
    manifest = _manifest(corpus)
    held = set(manifest["heldout_families"])
    families = pydoc_clean._FAMILIES

    def family_of(name):
        top = name.split(".")[0]
        return families.get(top, top)

    # Modules: every training row that names its object (signatures, module headers) names a
    # training module.
    named = [row["input"] for row in _jsonl(corpus / "sft.jsonl") if row["instruction"].startswith(
        ("Explain what this", "Describe this", "Summarise this module"))]
    named += [row["query"] for row in _jsonl(corpus / "pairs.jsonl")]
    named += [row["text"].split("\n", 1)[0] for row in _jsonl(corpus / "pretrain.jsonl")]
    checked = 0
    for text in named:
        # "pkg.mod.func(...)", "class pkg.mod.Cls(...)", "Module pkg", "pkg: summary".
        match = re.match(r"(class |Module )?([A-Za-z_][\w.]*)([(:\n]|$)", text)
        if match and (match.group(1) or "." in match.group(2) or match.group(3) == ":"):
            checked += 1
            assert family_of(match.group(2)) not in held, text
    assert checked > 500
    # Texts: no held-out document or query is a training text, and no held-out document shares
    # half of its word 8-grams with the training text.
    training = _training_strings(corpus)
    exact = {_normalise(text) for text in training}
    grams = set()
    for text in training:
        grams |= _word_8grams(text)
    for document in _jsonl(corpus / "heldout" / "corpus.jsonl"):
        assert _normalise(document["text"]) not in exact
        own = _word_8grams(document["text"])
        assert not own or 2 * len(own & grams) < len(own), document["_id"]
        assert family_of(document["_id"]) in held
    for query in _jsonl(corpus / "heldout" / "queries.jsonl"):
        assert _normalise(query["text"]) not in exact, query


def _report(path):
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def test_outputs_are_what_the_tools_read(corpus, tmp_path):
    """Tokenizer training, SFT and text preprocessing, contrastive tokenization: no bad line."""
    tokenizer = str(tmp_path / "tok")
    assert train_tokenizer_command.main(
        ["--input", str(corpus / "pretrain.jsonl"), "--model-prefix", tokenizer,
         "--vocab-size", "1000", "--num-threads", "1"]) == 0
    runs = [(preprocess_command, "pretrain.jsonl", ["--format", "text"]),
            (preprocess_command, "sft.jsonl", ["--format", "sft"])]
    runs += [(tokenize_contrastive_command, name, [])
             for name in ("pairs.jsonl", "retrieval.jsonl", "sts.jsonl", "classification.jsonl")]
    for command, name, extra in runs:
        report = tmp_path / f"{name}.report.json"
        status = command.main(
            ["--input", str(corpus / name), "--output-prefix", str(tmp_path / name),
             "--tokenizer-model", tokenizer + ".model", "--no-progress", "--strict",
             "--report-json", str(report), *extra])
        assert status == 0, name
        result = _report(report)
        lines = _manifest(corpus)["files"][name]["lines"]
        assert result["bad_lines"]["total"] == 0 and result["documents"] == lines == result["lines"], name


def test_task_files_are_well_formed(corpus):
    retrieval = _jsonl(corpus / "retrieval.jsonl")
    assert {row["instruction"] for row in retrieval} == {pydoc_write.RETRIEVAL_INSTRUCTION}
    assert all("negatives" not in row for row in retrieval)
    mining = {row["text"] for row in _jsonl(corpus / "corpus.jsonl")}
    assert {row["positive"] for row in retrieval} <= mining
    sts = _jsonl(corpus / "sts.jsonl")
    assert {row["score"] for row in sts} == {0.0, 1.0, 2.0, 3.0, 4.0}
    classification = _jsonl(corpus / "classification.jsonl")
    labels = {row["label"] for row in classification}
    assert len(labels) == 8
    assert all(set(row["negative_labels"]) == labels - {row["label"]} for row in classification)
    assert all(row["output"].strip() and row["instruction"] for row in _jsonl(corpus / "sft.jsonl"))


def _closest_relation(anchor, partner):
    """STS_LEVELS, computed independently of the sampler."""
    def class_of(entry):
        if entry.kind == "class":
            return entry.qualname
        return entry.qualname.rsplit(".", 1)[0] if entry.kind in ("method", "attribute") else None

    if anchor is partner:
        return 4
    if class_of(anchor) is not None and class_of(anchor) == class_of(partner):
        return 3
    if anchor.module == partner.module:
        return 2
    return 1 if anchor.family == partner.family else 0


def test_sts_score_is_the_closest_structural_relation(corpus):
    config = PydocCorpusConfig(max_sts_anchors=40)
    split = pydoc_split.split_collection(pydoc_clean.collect(config), config)
    triples = pydoc_write.sts_pairs(split, config)
    assert {level for _, _, level in triples} == {0, 1, 2, 3, 4}
    for anchor, partner, level in triples:
        assert _closest_relation(anchor, partner) == level, (anchor.qualname, partner.qualname)
    # The file is these triples: the anchor's summary beside the start of the partner's rest.
    rows = _jsonl(corpus / "sts.jsonl")
    assert len(rows) == len(triples)
    for row, (anchor, partner, level) in zip(rows, triples):
        assert (row["text1"], row["score"]) == (anchor.summary, float(level))
        assert " ".join(partner.body.split()).startswith(row["text2"])


def test_pretraining_stream_repeats_to_a_target_size(corpus, tmp_path):
    one_pass = list(pydoc_write.iter_pretraining_texts())
    assert one_pass == [row["text"] for row in _jsonl(corpus / "pretrain.jsonl")]
    target = 3 * _manifest(corpus)["files"]["pretrain.jsonl"]["bytes"] // 2
    path = tmp_path / "big.jsonl"
    documents, written = pydoc_write.write_pretraining_jsonl(str(path), target_bytes=target)
    assert written == path.stat().st_size >= target
    texts = [row["text"] for row in _jsonl(path)]
    assert len(texts) == documents > len(one_pass)
    assert texts[:len(one_pass)] == one_pass and set(texts) == set(one_pass)
    assert texts[len(one_pass):2 * len(one_pass)] != one_pass[:len(texts) - len(one_pass)]
    assert os.listdir(tmp_path) == ["big.jsonl"]


def test_bad_input_is_one_line_and_exit_2(corpus, tmp_path):
    before = _files(corpus)
    refused = subprocess.run(_build_command(corpus), capture_output=True, text=True)
    assert refused.returncode == 2 and _files(corpus) == before
    assert refused.stderr.count("\n") == 1 and "exists (pass --overwrite to replace it)" in refused.stderr
    bad = subprocess.run(_build_command(tmp_path / "out", "max_sts_anchors=0"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "max_sts_anchors" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out").exists()
