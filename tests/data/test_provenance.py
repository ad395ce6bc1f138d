"""Every dataset records its tokenizer; a run with another tokenizer is refused clearly; merging
keeps the record."""

import json
import logging
import os
import shutil

import pytest

from megatron_conan.cli import preprocess as preprocess_command
from megatron_conan.data.provenance import (
    TokenizerMismatchError,
    check_tokenizer,
    meta_path,
    read_record,
)
from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer
from megatron_conan.errors import DataError, InputError
from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, preprocess_jsonl


@pytest.fixture(scope="module")
def datasets(corpus_dir, tokenizer_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("provenance")
    source = corpus_dir / "mixed.jsonl"
    sft = directory / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n", encoding="utf-8")
    made = {}
    for name, inputs, kind in (("a", [source], "text"), ("b", [source], "text"),
                               ("sft", [sft], "sft")):
        prefix = str(directory / name)
        preprocess_jsonl(PreprocessConfig([str(path) for path in inputs], prefix,
                                          tokenizer_model, format=kind, progress=False))
        made[name] = prefix
    other = str(directory / "other_tokenizer")
    train_tokenizer([str(source)], other, TokenizerTrainingConfig(vocab_size=900, num_threads=1))
    made["other_model"] = other + ".model"
    return made


def test_record_names_the_tokenizer_and_the_counts(datasets, tokenizer):
    record = read_record(datasets["a"])
    assert record["tokenizer"]["sha256"] == tokenizer.unique_identifiers["model_sha256"]
    assert record["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert (record["format"], record["kind"], record["documents"]) == (
        "megatron_conan.indexed", "text", 400)
    assert read_record(datasets["sft"])["kind"] == "sft"
    assert check_tokenizer(datasets["a"], tokenizer) == record
    assert check_tokenizer(datasets["sft"], tokenizer.model_path)["sequences"] == 2


def test_another_tokenizer_is_refused_with_a_clear_error(datasets):
    with pytest.raises(TokenizerMismatchError, match=r"1000-id tokenizer.*900 ids") as error:
        check_tokenizer(datasets["a"], datasets["other_model"])
    assert isinstance(error.value, InputError) and "\n" not in str(error.value)


def test_same_vocabulary_other_model_is_refused_by_hash(datasets, tokenizer_model, tmp_path):
    record = read_record(datasets["a"])
    record["tokenizer"]["sha256"] = "0" * 64
    prefix = str(tmp_path / "edited")
    for suffix in (".bin", ".idx"):
        shutil.copy(datasets["a"] + suffix, prefix + suffix)
    with open(meta_path(prefix), "w", encoding="utf-8") as stream:
        json.dump(record, stream)
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        check_tokenizer(prefix, tokenizer_model)


def test_data_without_a_record_is_accepted_with_one_warning(datasets, tokenizer, tmp_path,
                                                            caplog):
    prefix = str(tmp_path / "old")
    for suffix in (".bin", ".idx"):
        shutil.copy(datasets["a"] + suffix, prefix + suffix)
    with caplog.at_level(logging.WARNING, logger="megatron_conan.data.provenance"):
        assert check_tokenizer(prefix, tokenizer) is None
        assert check_tokenizer(prefix, tokenizer) is None
    assert sum("no tokenizer record" in record.message for record in caplog.records) == 1


def test_merge_keeps_the_record_and_refuses_other_tokenizers(datasets, tokenizer, tmp_path, capsys):
    tool = preprocess_command
    assert tool.main(["--merge", datasets["a"], datasets["b"], "--output-prefix",
                      str(tmp_path / "ab")]) == 0
    merged = check_tokenizer(str(tmp_path / "ab"), tokenizer)
    assert merged["documents"] == 800 and len(merged["inputs"]) == 2
    capsys.readouterr()
    edited = str(tmp_path / "edited")
    for suffix in (".bin", ".idx"):
        shutil.copy(datasets["b"] + suffix, edited + suffix)
    record = read_record(datasets["b"])
    record["tokenizer"]["sha256"] = "f" * 64
    with open(meta_path(edited), "w", encoding="utf-8") as stream:
        json.dump(record, stream)
    unrecorded = str(tmp_path / "unrecorded")
    for suffix in (".bin", ".idx"):
        shutil.copy(datasets["b"] + suffix, unrecorded + suffix)
    for shards, message in (([datasets["a"], edited], "different tokenizers"),
                            ([datasets["a"], unrecorded], "has none"),
                            ([datasets["a"], datasets["sft"]], "is text data")):
        assert tool.main(["--merge", *shards, "--output-prefix", str(tmp_path / "refused")]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
        assert not os.path.exists(tmp_path / "refused.idx")


def test_a_broken_record_is_a_data_error(datasets, tmp_path, tokenizer):
    prefix = str(tmp_path / "broken")
    for suffix in (".bin", ".idx"):
        shutil.copy(datasets["a"] + suffix, prefix + suffix)
    with open(meta_path(prefix), "w", encoding="utf-8") as stream:
        stream.write("{not json")
    with pytest.raises(DataError, match=r"broken\.meta\.json: not a JSON dataset record"):
        check_tokenizer(prefix, tokenizer)
