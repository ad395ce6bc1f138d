"""Where a tool may write (megatron_conan/outputs.py): an existing output needs --overwrite, an output
that is one of the inputs is refused with or without it, and a directory is replaced only when it is
the tool's own output and holds no input. Checked before any work, through the real entry points."""

import os

import pytest

from megatron_conan import outputs
from megatron_conan.cli import mine, preprocess, sft_to_pairs, tokenize_contrastive, train_tokenizer
from megatron_conan.errors import InputError
from megatron_conan.eval import encode, retrieval_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEIR_TINY = os.path.join(REPO, "tests", "data", "beir_tiny")
TEXT = '{"text": "Return a new sorted list from the items in iterable.", "query": "sort", "positive": "sorted"}\n'


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path):
    data = tmp_path / "x.jsonl"
    data.write_text(TEXT)
    os.link(data, tmp_path / "hard.jsonl")
    os.symlink(data, tmp_path / "soft.jsonl")
    for alias in (data, tmp_path / "hard.jsonl", tmp_path / "soft.jsonl", tmp_path / "." / "x.jsonl"):
        with pytest.raises(InputError, match="is also an input"):
            outputs.check_output_files([str(alias)], [str(data)], overwrite=True)
    with pytest.raises(InputError, match="exists \\(pass --overwrite"):
        outputs.check_output_files([str(data)], [str(tmp_path / "other.jsonl")])
    outputs.check_output_files([str(data)], [str(tmp_path / "other.jsonl")], overwrite=True)
    outputs.check_output_files([str(tmp_path / "new.jsonl"), None], [str(data), None])


def test_a_directory_is_replaced_only_when_it_is_the_tools_own_and_holds_no_input(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "record.json").write_text("{}")
    outputs.check_output_dir(str(tmp_path / "new"), [str(run)])
    with pytest.raises(InputError, match="exists \\(pass --overwrite"):
        outputs.check_output_dir(str(run), [], record="record.json")
    for output, source, relation in ((run, run / "checkpoints", "contains"), (run / "checkpoints", run, "lies inside"),
                                     (run, run, "is")):
        with pytest.raises(InputError, match=f"{relation} input"):
            outputs.check_output_dir(str(output), [str(source)], overwrite=True, record="record.json")
    with pytest.raises(InputError, match="it has no other.json"):
        outputs.check_output_dir(str(run), [], overwrite=True, record="other.json")
    outputs.check_output_dir(str(run), [str(tmp_path / "elsewhere")], overwrite=True, record="record.json")


def _same_file_cases(tmp_path):
    data = str(tmp_path / "x.jsonl")
    prefix = str(tmp_path / "web")
    return {  # tool, argv, the file that must stay as it was
        "mine": (mine, ["--input", data, "--output", data, "--model", str(tmp_path / "no-model")], data),
        "sft-to-pairs": (sft_to_pairs, ["--input", data, "--output", data], data),
        "encode": (encode, [str(tmp_path / "no-model"), "--input", data, "--output", data], data),
        "train-tokenizer": (train_tokenizer, ["--input", prefix + ".model", "--model-prefix", prefix],
                            prefix + ".model"),
        "preprocess merge": (preprocess, ["--merge", prefix, "--output-prefix", prefix], prefix + ".bin"),
        "tokenize-contrastive": (tokenize_contrastive, ["--input", prefix + ".bin", "--output-prefix", prefix,
                                                        "--tokenizer-model", data], prefix + ".bin"),
    }


@pytest.mark.parametrize("name", ["mine", "sft-to-pairs", "encode", "train-tokenizer", "preprocess merge",
                                  "tokenize-contrastive"])
def test_a_tool_never_replaces_its_own_input(tmp_path, capsys, name):
    tool, argv, kept = _same_file_cases(tmp_path)[name]
    for path in (tmp_path / "x.jsonl", tmp_path / "web.bin", tmp_path / "web.idx", tmp_path / "web.model"):
        path.write_text(TEXT)
    for extra in ([], ["--overwrite"]):
        assert tool.main(argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is also an input" in err, err
    with open(kept, encoding="utf-8") as handle:
        assert handle.read() == TEXT


def test_an_existing_output_needs_overwrite(tmp_path, capsys):
    (tmp_path / "results.json").write_text("earlier results\n")
    argv = [BEIR_TINY, "--baselines", "random", "--output", str(tmp_path / "results.json"), "--no-progress"]
    assert retrieval_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists (pass --overwrite to replace it)" in err, err
    assert (tmp_path / "results.json").read_text() == "earlier results\n"
    assert retrieval_cli.main(argv + ["--overwrite"]) == 0
    assert '"random"' in (tmp_path / "results.json").read_text()
