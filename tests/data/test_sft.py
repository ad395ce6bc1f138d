import json

import numpy
import pytest
import torch

from megatron_conan.data.jsonl import BadLineKind
from megatron_conan.data.sft import SFTDataset, build_sft_datasets, build_sft_example, split_indices
from megatron_conan.datagen import synthetic
from megatron_conan.errors import DataError
from megatron_conan.preprocess.encoders import format_sft_prompt
from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, preprocess_jsonl

PAD, EOD = 0, 3


def test_example_position_by_position():
    sample = build_sft_example([10, 11, 12], [20, 21], seq_length=8, pad_id=PAD, eod_id=EOD)
    # full sequence: 10 11 12 20 21 EOD
    assert sample["tokens"].tolist() == [10, 11, 12, 20, 21, PAD, PAD, PAD]
    assert sample["labels"].tolist() == [11, 12, 20, 21, EOD, PAD, PAD, PAD]
    # loss exactly where the label is an output token (20, 21) or the final EOD
    assert sample["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert sample["position_ids"].tolist() == list(range(8))
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32


def test_exact_fit_and_truncation():
    exact = build_sft_example([10, 11], [20, 21, 22], seq_length=5, pad_id=PAD, eod_id=EOD)
    assert exact["labels"].tolist() == [11, 20, 21, 22, EOD]
    assert exact["loss_mask"].tolist() == [0, 1, 1, 1, 1]
    cut = build_sft_example([10, 11], [20, 21, 22], seq_length=3, pad_id=PAD, eod_id=EOD)
    assert cut["tokens"].tolist() == [10, 11, 20] and cut["labels"].tolist() == [11, 20, 21]
    assert cut["loss_mask"].tolist() == [0, 1, 1]
    prompt_only = build_sft_example([10, 11, 12, 13], [20], seq_length=2, pad_id=PAD, eod_id=EOD)
    assert prompt_only["loss_mask"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="seq_length"):
        build_sft_example([1], [2], seq_length=0, pad_id=PAD, eod_id=EOD)


def test_loss_mask_matches_output_tokens_for_random_shapes():
    rng = numpy.random.default_rng(0)
    for _ in range(200):
        prompt = rng.integers(10, 100, rng.integers(0, 12)).tolist()
        output = rng.integers(10, 100, rng.integers(0, 12)).tolist()
        seq_length = int(rng.integers(1, 30))
        sample = build_sft_example(prompt, output, seq_length, PAD, EOD)
        full = prompt + output + [EOD]
        for position in range(seq_length):
            label_index = position + 1
            is_output = len(prompt) <= label_index < len(full)
            assert sample["loss_mask"][position] == float(is_output)
            if label_index < len(full):
                assert sample["labels"][position] == full[label_index]
                assert sample["tokens"][position] == full[position]
            else:
                assert sample["labels"][position] == PAD


def test_prompt_template():
    assert format_sft_prompt("Do it.", "some input") == (
        "### Instruction:\nDo it.\n\n### Input:\nsome input\n\n### Response:\n")
    assert format_sft_prompt("Do it.", "") == format_sft_prompt("Do it.") == (
        "### Instruction:\nDo it.\n\n### Response:\n")


def test_preprocess_and_dataset_round_trip(tokenizer, tokenizer_model, tmp_path):
    source = tmp_path / "sft.jsonl"
    synthetic.write_sft_jsonl(str(source), num_examples=30)
    with open(source, "a", encoding="utf-8") as stream:
        stream.write(json.dumps({"instruction": "x", "output": ""}) + "\n")
        stream.write(json.dumps({"instruction": "x", "input": 3, "output": "y"}) + "\n")
    result = preprocess_jsonl(PreprocessConfig([str(source)], str(tmp_path / "sft"),
                                               tokenizer_model, format="sft", progress=False,
                                               workers=2))
    assert result.documents == 30 and result.sequences == 60
    assert result.bad_lines.count(BadLineKind.EMPTY_TEXT) == 1
    assert result.bad_lines.count(BadLineKind.NON_STRING_FIELD) == 1
    rows = [json.loads(line) for line in open(source, encoding="utf-8")][:30]
    dataset = SFTDataset(str(tmp_path / "sft"), seq_length=256, pad_id=tokenizer.pad_id,
                         eod_id=tokenizer.eod_id)
    assert len(dataset) == 30
    for index, row in enumerate(rows):
        prompt_ids = tokenizer.encode(format_sft_prompt(row["instruction"], row.get("input")))
        output_ids = tokenizer.encode(row["output"])
        assert dataset.prompt_length(index) == len(prompt_ids)
        stored_prompt, stored_output = dataset.example(index)
        assert stored_prompt.tolist() == prompt_ids and stored_output.tolist() == output_ids
        expected = build_sft_example(prompt_ids, output_ids, 256, tokenizer.pad_id, tokenizer.eod_id)
        sample = dataset[index]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(sample[key], expected[key]), key
        assert int(sample["loss_mask"].sum()) == min(len(output_ids) + 1,
                                                     256 - len(prompt_ids) + 1)


def test_splits_are_disjoint_and_deterministic(tokenizer, tokenizer_model, tmp_path):
    source = tmp_path / "sft.jsonl"
    synthetic.write_sft_jsonl(str(source), num_examples=50)
    preprocess_jsonl(PreprocessConfig([str(source)], str(tmp_path / "sft"), tokenizer_model,
                                      format="sft", progress=False))
    train, valid, test = build_sft_datasets(str(tmp_path / "sft"), tokenizer, 64, split="80,10,10",
                                            seed=3)
    parts = [set(part.indices.tolist()) for part in (train, valid, test)]
    assert [len(part) for part in parts] == [40, 5, 5]
    assert set.union(*parts) == set(range(50)) and sum(map(len, parts)) == 50
    again = split_indices(50, "80,10,10", seed=3)
    assert all(numpy.array_equal(a, b.indices) for a, b in zip(again, (train, valid, test)))
    assert build_sft_datasets(str(tmp_path / "sft"), tokenizer, 64, split="100,0,0")[1] is None


def test_rejects_pretraining_data(corpus_dir, tokenizer, tokenizer_model, tmp_path):
    preprocess_jsonl(PreprocessConfig([str(corpus_dir / "mixed.jsonl")], str(tmp_path / "text"),
                                      tokenizer_model, progress=False))
    with pytest.raises(DataError, match="not an SFT dataset"):
        SFTDataset(str(tmp_path / "text"), 32, tokenizer.pad_id, tokenizer.eod_id)
