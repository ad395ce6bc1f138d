import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy
import pytest
import zstandard

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron_conan.cli import preprocess as preprocess_command
from megatron_conan.data.indexed import merge_indexed_datasets, token_dtype_for_vocab
from megatron_conan.data.jsonl import BadLineKind, StrictModeError
from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, preprocess_jsonl
from tests.data.adversarial import docs_texts, docs_tokenizer_model  # noqa: F401  (fixtures)


def _texts(path):
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


def _expected(tokenizer, texts):
    return [tokenizer.encode(text) + [tokenizer.eod] for text in texts]


def _read_back(prefix):
    dataset = IndexedDataset(str(prefix))
    return [dataset[index].tolist() for index in range(len(dataset))], dataset


def _run(inputs, prefix, tokenizer_model, **options):
    options.setdefault("progress", False)
    return preprocess_jsonl(PreprocessConfig([str(path) for path in inputs], str(prefix),
                                             tokenizer_model, **options))


def test_dtype_follows_vocab_size():
    assert token_dtype_for_vocab(1000) == numpy.uint16
    assert token_dtype_for_vocab(150_000) == numpy.int32


@pytest.mark.parametrize("workers,dtype", [(1, "auto"), (2, "auto"), (1, "int32"), (2, "int32")])
def test_round_trip(corpus_dir, tokenizer, tokenizer_model, tmp_path, workers, dtype):
    source = corpus_dir / "mixed.jsonl"
    result = _run([source], tmp_path / "out", tokenizer_model, workers=workers, dtype=dtype,
                  batch_lines=37)  # many small work items, so the order across workers matters
    expected = _expected(tokenizer, _texts(source))
    stored, dataset = _read_back(tmp_path / "out")
    assert stored == expected
    assert dataset.index.dtype == (numpy.uint16 if dtype == "auto" else numpy.int32)
    assert list(dataset.document_indices) == list(range(len(expected) + 1))
    assert (result.documents, result.tokens) == (len(expected), sum(map(len, expected)))
    assert result.bad_lines.total == 0


def test_compressed_inputs_and_merge(corpus_dir, tokenizer, tokenizer_model, tmp_path):
    texts = _texts(corpus_dir / "mixed.jsonl")
    lines = [json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts]
    halves = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.zst"]
    with gzip.open(halves[0], "wt", encoding="utf-8") as stream:
        stream.writelines(lines[:150])
    with zstandard.open(halves[1], "wt", encoding="utf-8") as stream:
        stream.writelines(lines[150:])
    for index, half in enumerate(halves):
        _run([half], tmp_path / f"shard{index}", tokenizer_model)
    merged = merge_indexed_datasets([str(tmp_path / "shard0"), str(tmp_path / "shard1")],
                                    str(tmp_path / "merged"))
    stored, dataset = _read_back(tmp_path / "merged")
    assert stored == _expected(tokenizer, texts)
    assert merged.num_documents == len(texts)
    assert list(dataset.document_indices) == list(range(len(texts) + 1))
    # one run over both inputs gives the same files as the merge of the two shards
    _run(halves, tmp_path / "together", tokenizer_model)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"together{suffix}").read_bytes() == (
            tmp_path / f"merged{suffix}").read_bytes()


def test_merge_refuses_mixed_dtypes(corpus_dir, tokenizer_model, tmp_path):
    _run([corpus_dir / "mixed.jsonl"], tmp_path / "small", tokenizer_model)
    _run([corpus_dir / "mixed.jsonl"], tmp_path / "wide", tokenizer_model, dtype="int32")
    with pytest.raises(ValueError, match="dtype"):
        merge_indexed_datasets([str(tmp_path / "small"), str(tmp_path / "wide")],
                               str(tmp_path / "merged"))
    assert not IndexedDataset.exists(str(tmp_path / "merged"))
    assert not list(tmp_path.glob("*.tmp-*"))


BAD_LINES = [
    (b'{"text": "good one"}', None),
    (b'{"text": "bad \xff\xfe bytes"}', BadLineKind.INVALID_UTF8),
    (b'{"text": "lone \\ud800 surrogate"}', BadLineKind.INVALID_UTF8),
    (b'{"text": "unterminated', BadLineKind.MALFORMED_JSON),
    (b'["a", "list"]', BadLineKind.MALFORMED_JSON),
    (b'{"body": "no text field"}', BadLineKind.MISSING_FIELD),
    (b'{"text": null}', BadLineKind.MISSING_FIELD),
    (b'{"text": 42}', BadLineKind.NON_STRING_FIELD),
    (b'{"text": ["a"]}', BadLineKind.NON_STRING_FIELD),
    (b'{"text": ""}', BadLineKind.EMPTY_TEXT),
    (b'{"text": "   \\n "}', BadLineKind.EMPTY_TEXT),
    (b'{"text": "' + b"x" * 300 + b'"}', BadLineKind.TOO_LONG),
    (b"   ", BadLineKind.BLANK_LINE),
    (b'{"text": "good two"}', None),
]


def _write_bad_input(path):
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")


@pytest.mark.parametrize("workers", [1, 2])
def test_every_bad_kind_is_counted_and_located(tokenizer, tokenizer_model, tmp_path, workers):
    source = tmp_path / "bad.jsonl"
    _write_bad_input(source)
    result = _run([source], tmp_path / "out", tokenizer_model, workers=workers,
                  max_line_bytes=200, max_bad_line_examples=1)
    expected_kinds = [kind for _, kind in BAD_LINES if kind is not None]
    for kind in set(expected_kinds):
        assert result.bad_lines.count(kind) == expected_kinds.count(kind), kind
        first_line = 1 + next(number for number, (_, line_kind) in enumerate(BAD_LINES)
                              if line_kind == kind)
        [example] = result.bad_lines.examples[kind]  # only the first is kept (max 1)
        assert (example.path, example.line_number) == (str(source), first_line)
    assert result.lines == len(BAD_LINES)
    assert result.documents + result.bad_lines.total == result.lines  # nothing dropped silently
    stored, _ = _read_back(tmp_path / "out")
    assert stored == _expected(tokenizer, ["good one", "good two"])
    report = result.format()
    assert f"{source}:2: invalid_utf8" in report and "... 1 more" in report


def test_strict_stops_with_nonzero_exit_and_no_output(tokenizer_model, tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    _write_bad_input(source)
    with pytest.raises(StrictModeError, match=r"bad\.jsonl:2: invalid_utf8"):
        _run([source], tmp_path / "lib", tokenizer_model, strict=True)
    tool = preprocess_command
    code = tool.main(["--input", str(source), "--output-prefix", str(tmp_path / "cli"),
                      "--tokenizer-model", tokenizer_model, "--strict", "--no-progress",
                      "--workers", "2"])
    assert code == 2
    printed = capsys.readouterr()
    assert printed.err.count("\n") == 1 and "bad.jsonl:2" in printed.err
    assert "no output written" in printed.out and "invalid_utf8: 1" in printed.out
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_all_bad_input_is_an_error_without_output(tokenizer_model, tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b'{"text": ""}\n{oops\n')
    tool = preprocess_command
    assert tool.main(["--input", str(source), "--output-prefix", str(tmp_path / "out"),
                      "--tokenizer-model", tokenizer_model, "--no-progress"]) == 2
    printed = capsys.readouterr()
    assert "empty_text: 1" in printed.out and "malformed_json: 1" in printed.out
    assert printed.err.count("\n") == 1 and "no documents" in printed.err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_failure_midway_leaves_nothing_and_keeps_old_output(corpus_dir, tokenizer_model,
                                                             tmp_path):
    prefix = tmp_path / "out"
    _run([corpus_dir / "mixed.jsonl"], prefix, tokenizer_model)
    before = (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())
    bad = tmp_path / "late_error.jsonl"
    bad.write_text(open(corpus_dir / "mixed.jsonl", encoding="utf-8").read() + "{oops\n",
                   encoding="utf-8")
    with pytest.raises(StrictModeError):
        _run([bad], prefix, tokenizer_model, strict=True, batch_lines=50)
    assert (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()) == before
    assert not list(tmp_path.glob("*.tmp-*"))


def _start_tool_on_fifo(tmp_path, tokenizer_model, corpus_dir):
    """Starts the tool on a named pipe and feeds it half the corpus, leaving the pipe open so the
    tool is stuck mid-way; returns (process, pipe writer, output prefix)."""
    fifo = tmp_path / "input.jsonl"
    os.mkfifo(fifo)
    prefix = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "megatron_conan.cli.preprocess", "--input",
         str(fifo), "--output-prefix", str(prefix), "--tokenizer-model", tokenizer_model,
         "--batch-lines", "10", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writer = open(fifo, "w", encoding="utf-8")
    lines = open(corpus_dir / "mixed.jsonl", encoding="utf-8").readlines()
    writer.writelines(lines[:200])
    writer.flush()
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.idx.tmp-*/out.bin")):  # the tool has started writing
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the tool never started writing"
        time.sleep(0.05)
    return process, writer, prefix


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_no_complete_looking_output(corpus_dir, tokenizer_model, tmp_path, sig):
    process, writer, prefix = _start_tool_on_fifo(tmp_path, tokenizer_model, corpus_dir)
    process.send_signal(sig)
    process.wait(timeout=60)
    writer.close()
    assert process.returncode != 0
    assert not IndexedDataset.exists(str(prefix))
    assert not os.path.exists(f"{prefix}.bin") and not os.path.exists(f"{prefix}.idx")
    if sig == signal.SIGTERM:  # a catchable signal also removes the temporaries
        assert not list(tmp_path.glob(".out*.tmp-*"))


def test_tool_reports_and_writes_json(corpus_dir, tokenizer_model, tmp_path, capsys):
    tool = preprocess_command
    report = tmp_path / "report.json"
    assert tool.main(["--input", str(corpus_dir / "mixed.jsonl"), "--output-prefix",
                      str(tmp_path / "out"), "--tokenizer-model", tokenizer_model,
                      "--no-progress", "--report-json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "tokens/s" in out and "MB/s" in out
    summary = json.loads(report.read_text())
    assert summary["documents"] == 400 and summary["bad_lines"]["total"] == 0
    assert tool.main(["--merge", str(tmp_path / "out"), str(tmp_path / "out"),
                      "--output-prefix", str(tmp_path / "twice")]) == 0
    assert len(IndexedDataset(str(tmp_path / "twice"))) == 800


def test_byte_order_mark_at_the_start_of_a_file_is_accepted(tokenizer, tokenizer_model, tmp_path):
    plain = tmp_path / "bom.jsonl"
    plain.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    compressed = tmp_path / "bom.jsonl.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    mid_file = tmp_path / "mid.jsonl"  # a BOM anywhere else is data: not JSON
    mid_file.write_bytes(b'{"text": "first"}\n\xef\xbb\xbf{"text": "second"}\n')
    result = _run([plain, compressed, mid_file], tmp_path / "out", tokenizer_model)
    assert result.documents == 5 and result.bad_lines.count(BadLineKind.MALFORMED_JSON) == 1
    assert [example.line_number for example in
            result.bad_lines.examples[BadLineKind.MALFORMED_JSON]] == [2]
    stored, _ = _read_back(tmp_path / "out")
    assert stored[:2] == _expected(tokenizer, ["first", "second"])


def test_tokenizer_training_accepts_a_byte_order_mark(tmp_path):
    from megatron_conan.data.jsonl import BadLineReport
    from megatron_conan.data.tokenizer import iter_training_lines

    text, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    text.write_bytes(b"\xef\xbb\xbfplain line\nsecond\n")
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "json line"}\n')
    report = BadLineReport()
    assert list(iter_training_lines([str(text), str(jsonl)], "text", report)) == [
        "plain line", "second", "json line"]
    assert report.total == 0


def _half_bad(path, bad_every):
    lines = [b'{"text": "line %d"}' % index if index % bad_every else b"{oops"
             for index in range(1, 201)]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_more_bad_lines_than_allowed_fails_after_the_full_report(tokenizer_model, tmp_path, capsys):
    source = tmp_path / "some_bad.jsonl"
    _half_bad(source, bad_every=40)  # 5 of 200 lines bad: 2.5%
    tool = preprocess_command
    report = tmp_path / "report.json"
    arguments = ["--input", str(source), "--tokenizer-model", tokenizer_model, "--no-progress"]
    assert tool.main(arguments + ["--output-prefix", str(tmp_path / "out"),
                                  "--report-json", str(report)]) == 2
    printed = capsys.readouterr()
    assert "195 documents" in printed.out and "malformed_json: 5" in printed.out
    assert "some_bad.jsonl:40" in printed.out  # the first location
    assert printed.err.count("\n") == 1 and "2.50%" in printed.err and "1.00%" in printed.err
    assert json.loads(report.read_text())["bad_lines"]["total"] == 5
    assert os.path.exists(tmp_path / "out.idx")  # written all the same
    assert tool.main(arguments + ["--output-prefix", str(tmp_path / "ok"),
                                  "--max-bad-fraction", "0.03"]) == 0
    capsys.readouterr()
    assert tool.main(arguments + ["--output-prefix", str(tmp_path / "strict"), "--strict"]) == 2
    assert "some_bad.jsonl:40" in capsys.readouterr().err
    assert not list(tmp_path.glob("strict*"))


@pytest.mark.parametrize("workers,model", [(1, "tokenizer_model"), (2, "docs_tokenizer_model")])
def test_cache_on_and_off_write_identical_files(corpus_dir, request, tmp_path, workers, model):
    """On real text (Python's docs, with indentation), adversarial text and the synthetic mix,
    also with a tokenizer that has whitespace-only pieces."""
    from pydoc_data.topics import topics

    from tests.data.adversarial import ADVERSARIAL, random_texts

    tokenizer_model = request.getfixturevalue(model)
    texts = ([topics[key] for key in sorted(topics)][:30] + ADVERSARIAL + random_texts(300, 7)
             + _texts(corpus_dir / "mixed.jsonl"))
    source = tmp_path / "mixed_real_adversarial.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts if text.strip()),
                      encoding="utf-8")
    for cache in (True, False):
        _run([source], tmp_path / f"c{cache}", tokenizer_model, workers=workers,
             word_cache=cache, format="text", batch_lines=64)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"cTrue{suffix}").read_bytes() == (
            tmp_path / f"cFalse{suffix}").read_bytes()


def test_verify_sample_passes_and_catches_a_wrong_encoding(corpus_dir, tokenizer_model,
                                                           tmp_path, monkeypatch):
    from megatron_conan.data.word_cache import CachedEncoder
    from megatron_conan.preprocess.jsonl_to_indexed import VerificationError

    result = _run([corpus_dir / "mixed.jsonl"], tmp_path / "ok", tokenizer_model,
                  verify_sample=50, workers=2)
    assert result.verified == 50 and "50 documents verified" in result.format()
    original = CachedEncoder.encode

    def off_by_one(self, texts):  # a cache bug: one id wrong in one document
        encoded = original(self, texts)
        if encoded and encoded[0]:
            encoded[0][0] += 1
        return encoded

    monkeypatch.setattr(CachedEncoder, "encode", off_by_one)
    with pytest.raises(VerificationError, match=r"mixed\.jsonl:\d+: the stored ids differ"):
        _run([corpus_dir / "mixed.jsonl"], tmp_path / "bad", tokenizer_model,
             verify_sample=400, batch_lines=100)
    assert not list(tmp_path.glob("bad*"))


def test_threads_follow_the_workers(tokenizer_model, corpus_dir):
    from megatron_conan.data.word_cache import default_threads
    from megatron_conan.preprocess.jsonl_to_indexed import make_encoder

    cores = len(os.sched_getaffinity(0))
    config = PreprocessConfig([str(corpus_dir / "mixed.jsonl")], "unused", tokenizer_model,
                              workers=1)
    assert make_encoder(config).num_threads == cores == default_threads(1)
    config = PreprocessConfig([str(corpus_dir / "mixed.jsonl")], "unused", tokenizer_model,
                              workers=2 * cores, threads=0)
    assert make_encoder(config).num_threads == 1
    config.threads = 3
    assert make_encoder(config).num_threads == 3


def test_tool_writes_contrastive_stores_too(tokenizer_model, tmp_path, tokenizer):
    from megatron_conan.data.contrastive import ContrastiveStore
    from megatron_conan.data.provenance import check_tokenizer

    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"task": "pair", "query": "what loops?", "positive": "for"})
                      + "\n", encoding="utf-8")
    assert preprocess_command.main([
        "--input", str(source), "--output-prefix", str(tmp_path / "store"), "--format",
        "contrastive", "--tokenizer-model", tokenizer_model, "--no-progress"]) == 0
    store = ContrastiveStore(str(tmp_path / "store"))
    assert store.example(0).anchor.tolist() == tokenizer.encode("what loops?")
    assert check_tokenizer(str(tmp_path / "store"), tokenizer)["format"] == (
        "megatron_conan.contrastive")
