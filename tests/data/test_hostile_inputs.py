"""Huge and hostile inputs (megatron_conan/testing/hostile.py, generated here, never committed) through
preprocess, tokenize-contrastive, train-tokenizer, mine, eval and the indexed reader: each run ends
in one stderr line and exit status 2, with the bad lines located in a non-strict run's report, and
stays under 1 GiB of resident memory (measured per run: VmHWM, reset before each)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_conan.data.indexed import read_index
from megatron_conan.errors import DataError
from megatron_conan.testing.hostile import write_hostile_corpus

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEIR_TINY = os.path.join(REPO, "tests", "data", "beir_tiny")
JSONL_FILES = ("huge.jsonl", "nul.jsonl", "deep.jsonl", "invalid_utf8.jsonl", "directory.jsonl")
LOCATED = {"huge.jsonl": "too_long", "nul.jsonl": "malformed_json", "deep.jsonl": "malformed_json: nested too deeply",
           "invalid_utf8.jsonl": "invalid_utf8"}
"""What a non-strict preprocessing run reports for each file's line 1."""
MEMORY_LIMIT = 1 << 30


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return write_hostile_corpus(str(tmp_path_factory.mktemp("hostile")))


def _beir_with_corpus(directory, corpus):
    """A copy of the tiny BEIR set whose corpus.jsonl is `corpus` (linked: the 2 GiB file is not copied)."""
    os.makedirs(directory)
    shutil.copy(os.path.join(BEIR_TINY, "queries.jsonl"), directory)
    shutil.copytree(os.path.join(BEIR_TINY, "qrels"), os.path.join(directory, "qrels"))
    os.symlink(corpus, os.path.join(directory, "corpus.jsonl"))
    return str(directory)


def _cases(hostile, tokenizer_model, out):
    cases = []
    for name in JSONL_FILES:
        path = hostile[name]
        stem = name.split(".")[0]
        common = ["--tokenizer-model", tokenizer_model, "--no-progress"]
        cases += [
            ("conan-preprocess", name, ["megatron_conan.cli.preprocess", "--input", path,
                                        "--output-prefix", f"{out}/pre_{stem}", *common]),
            ("conan-tokenize-contrastive", name, ["megatron_conan.cli.tokenize_contrastive", "--input", path,
                                                  "--output-prefix", f"{out}/store_{stem}", *common]),
            ("conan-train-tokenizer", name, ["megatron_conan.cli.train_tokenizer", "--input", path,
                                             "--model-prefix", f"{out}/tok_{stem}", "--vocab-size", "300"]),
            ("conan-mine", name, ["megatron_conan.cli.mine", "--input", path, "--output", f"{out}/mined_{stem}.jsonl",
                                  "--model", f"{out}/no-model-needed-first"]),
            ("conan-eval", name, ["megatron_conan.eval.retrieval_cli", _beir_with_corpus(f"{out}/beir_{stem}", path),
                                  "--baselines", "random", "--no-progress"]),
        ]
    for name in ("truncated", "claims"):
        cases.append(("conan-preprocess", name, ["megatron_conan.cli.preprocess", "--merge", hostile[name],
                                                 "--output-prefix", f"{out}/merged_{name}"]))
    return cases


@pytest.mark.slow
def test_every_tool_ends_hostile_input_in_one_line_within_bounded_memory(hostile, tokenizer_model, tmp_path):
    cases = _cases(hostile, tokenizer_model, str(tmp_path))
    with open(tmp_path / "cases.json", "w", encoding="utf-8") as handle:
        json.dump([{"module": argv[0], "argv": argv[1:]} for _, _, argv in cases], handle)
    driver = subprocess.run([sys.executable, "-m", "megatron_conan.testing.hostile", str(tmp_path / "cases.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = json.loads(driver.stdout.strip().splitlines()[-1])
    for (prog, name, _), result in zip(cases, results):
        where = (prog, name, result["stderr"][-2000:], result["code"])
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        assert result["code"] == 2, where
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), where
        assert result["peak_rss_bytes"] < MEMORY_LIMIT, (prog, name, result["peak_rss_bytes"])
        if prog in ("conan-preprocess", "conan-tokenize-contrastive") and name in LOCATED:
            assert f"{hostile[name]}:1: {LOCATED[name]}" in result["stdout"], where  # the located bad line
    peak = max(results, key=lambda result: result["peak_rss_bytes"])
    print(f"hostile inputs: {len(results)} runs, largest peak RSS {peak['peak_rss_bytes'] / 2**20:.0f} MiB")
    assert os.listdir(tmp_path) and not [entry for entry in os.listdir(tmp_path)
                                         if entry.startswith(("pre_", "store_", "tok_", "mined_", "merged_"))]


def test_the_indexed_reader_checks_the_header_before_allocating(hostile, tmp_path):
    with pytest.raises(DataError, match="truncated or corrupt index"):
        read_index(hostile["truncated"])
    with pytest.raises(DataError, match="announces 1,000,000,000,000 sequences"):
        read_index(hostile["claims"])
    (tmp_path / "folder.idx").mkdir()
    with pytest.raises(DataError, match="a directory, not an index file"):
        read_index(str(tmp_path / "folder"))


def test_an_over_long_line_is_skipped_unread_and_located(tmp_path):
    from megatron_conan.data.jsonl import BadLineKind, BadLineReport, OverlongLine, iter_file_lines
    from megatron_conan.data.tokenizer import iter_training_lines

    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "first"}\n' + b'{"text": "' + b"x" * 5000 + b'"}\n' + b'{"text": "third"}\n'
                     + b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}\n")
    lines = list(iter_file_lines(str(path), max_line_bytes=1000))
    assert [type(line) for line in lines] == [bytes, OverlongLine, bytes, OverlongLine]
    assert lines[1] == b"" and lines[1].size == 5013 and lines[2] == b'{"text": "third"}\n'
    report = BadLineReport()
    texts = list(iter_training_lines([str(path)], "text", report, max_bytes=3))
    assert texts == ["fir", "xxx", "thi"]  # cut as read: the sample never holds more
    assert report.counts == {BadLineKind.MALFORMED_JSON: 1}  # 10,000 levels fit 16 MiB, not the parser
    assert "mixed.jsonl:4: malformed_json: nested too deeply" in report.format()
