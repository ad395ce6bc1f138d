import pickle

import numpy
import pytest

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron_conan.cli import train_tokenizer as train_tokenizer_command
from megatron_conan.data.tokenizer import (
    BOS_ID, EOS_ID, PAD_ID, UNK_ID, ConanTokenizer, TokenizerTrainingConfig, train_tokenizer)

TINY_VOCAB = 1000  # conftest's tokenizer


def test_special_tokens_and_interface(tokenizer):
    assert tokenizer.vocab_size == TINY_VOCAB
    assert (tokenizer.pad, tokenizer.unk, tokenizer.bos, tokenizer.eos) == (PAD_ID, UNK_ID, BOS_ID,
                                                                            EOS_ID)
    assert tokenizer.eod == tokenizer.eod_id == EOS_ID and tokenizer.pad_id == PAD_ID
    assert tokenizer.vocab["<|reserved_0|>"] == 4
    assert tokenizer.inv_vocab[EOS_ID] == "</s>"
    assert tokenizer.encode("x <|reserved_3|> y").count(tokenizer.vocab["<|reserved_3|>"]) == 1


@pytest.mark.parametrize("text", ["Hello world, 2024!", "城市 市场\nЗдравствуйте", "  spaces  kept ",
                                  "rare ✓ emoji 🙂 via bytes"])
def test_round_trip_is_lossless(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.encode(text) == ids
    assert tokenizer.encode_batch([text, text]) == [ids, ids]


def test_pickles_and_identifies_by_content(tokenizer, tokenizer_model, tmp_path):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("abc def") == tokenizer.encode("abc def")
    copy = tmp_path / "copy.model"
    copy.write_bytes(open(tokenizer_model, "rb").read())
    assert ConanTokenizer(str(copy)).unique_identifiers == tokenizer.unique_identifiers


def test_accepted_by_megatron_gpt_dataset_config(tokenizer):
    config = GPTDatasetConfig(random_seed=1, sequence_length=16, tokenizer=tokenizer,
                              reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False)
    assert config.token_dtype_code == 8  # uint16 for a small vocab


def test_tool_trains_from_text_and_jsonl_and_counts_bad_lines(tmp_path, corpus_dir, capsys):
    train_tokenizer_tool = train_tokenizer_command
    text = tmp_path / "plain.txt"
    text.write_text("a plain line of text\nанother строка\n", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine line"}\n{broken\n{"text": 5}\n')
    prefix = tmp_path / "tok"
    assert train_tokenizer_tool.main([
        "--input", str(corpus_dir / "mixed.jsonl"), str(text), str(bad), "--model-prefix",
        str(prefix), "--vocab-size", "800", "--character-coverage", "0.995",
        "--num-threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "malformed_json: 1" in out and "non_string_field: 1" in out and "bad.jsonl:2" in out
    assert ConanTokenizer(str(prefix) + ".model").vocab_size == 800
    assert not list(tmp_path.glob("*.tmp-*"))


def test_sample_is_deterministic_and_bounded(corpus_dir, tmp_path):
    config = TokenizerTrainingConfig(vocab_size=800, character_coverage=0.995, max_sentences=200,
                                     num_threads=1)
    for name in ("a", "b"):
        train_tokenizer([str(corpus_dir / "mixed.jsonl")], str(tmp_path / name), config)
    # the model files differ only in the recorded model prefix; the pieces must agree
    assert ConanTokenizer(str(tmp_path / "a.model")).vocab == ConanTokenizer(
        str(tmp_path / "b.model")).vocab


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerTrainingConfig(vocab_size=100)
    with pytest.raises(ValueError, match="character_coverage"):
        TokenizerTrainingConfig(character_coverage=0)


def test_token_ids_fit_uint16(tokenizer):
    assert max(tokenizer.encode("any text at all 城市")) < numpy.iinfo(numpy.uint16).max
