"""The exported tokenizer gives ConanTokenizer's ids exactly, loaded offline by AutoTokenizer."""

import os

import pytest

from megatron_conan.conversion.tokenizer_export import export_tokenizer
from megatron_conan.data.tokenizer import EOS_ID, ConanTokenizer
from megatron_conan.errors import InputError
from megatron_conan.tasks import format_instruction
from megatron_conan.testing.tiny_models import pydoc_texts

MULTILINGUAL = [
    "Runs   of  spaces,\ttabs\t\tand\nnew\n\n\nlines   ",
    "Digits 0123456789 and 3.14159, 1,000,000",
    "中文分词测试：北京市的天气很好。 日本語のテキスト、カタカナ。 한국어 문장입니다.",
    "العربية: مرحبا بالعالم في المدينة",
    "emoji that need byte fallback 😀🎉👩‍👩‍👧 ∮ ∑ ☃",
    format_instruction("Given a question, retrieve passages that answer it") + "what is a generator?",
    "<|reserved_0|> user symbols, and control pieces as plain text: </s> <s> <pad> <unk>",
    " leading space",
    "",
]


@pytest.fixture(scope="module")
def exported(artifacts, tmp_path_factory):
    from transformers import AutoTokenizer

    directories = {}
    for name, append_eos in (("llm", False), ("embedder", True)):
        directory = tmp_path_factory.mktemp(f"tokenizer_{name}")
        export_tokenizer(artifacts["tokenizer"], str(directory), model_max_length=256, append_eos=append_eos)
        directories[name] = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return directories


def test_exported_ids_equal_conan_tokenizer_ids(artifacts, exported):
    conan = ConanTokenizer(artifacts["tokenizer"])
    texts = MULTILINGUAL + [text for _, text in zip(range(200), pydoc_texts())]
    for text in texts:
        expected = conan.encode(text)
        assert exported["llm"](text)["input_ids"] == expected, text
        assert exported["embedder"](text)["input_ids"] == expected + [EOS_ID], text
    pieces = [conan.inv_vocab[piece_id] for piece_id in conan.encode(MULTILINGUAL[4])]
    assert any(piece.startswith("<0x") for piece in pieces), "the emoji line must exercise byte fallback"


def test_exported_tokenizer_decodes_and_names_its_specials(exported):
    tokenizer = exported["llm"]
    for text in MULTILINGUAL:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 2, 3, 1)
    truncated = exported["embedder"](MULTILINGUAL[0], truncation=True, max_length=5)["input_ids"]
    assert len(truncated) == 5 and truncated[-1] == EOS_ID  # EOD kept, as training cuts texts


def test_tokenizer_config_names_a_class_older_transformers_know(artifacts, tmp_path):
    import json

    export_tokenizer(artifacts["tokenizer"], str(tmp_path), model_max_length=256)
    with open(os.path.join(tmp_path, "tokenizer_config.json")) as handle:
        config = json.load(handle)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["split_special_tokens"] is True
    assert sorted(os.listdir(tmp_path)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                            "tokenizer_config.json"]


def test_a_sentencepiece_model_of_another_kind_is_refused(tmp_path):
    import sentencepiece

    corpus = [text for _, text in zip(range(300), pydoc_texts())]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "unigram"),
                                             model_type="unigram", vocab_size=300, minloglevel=2)
    with pytest.raises(InputError, match="not a BPE model.*add_dummy_prefix.*no byte_fallback"):
        export_tokenizer(str(tmp_path / "unigram.model"), str(tmp_path), model_max_length=64)
