"""Texts that break naive pre-splitting (whitespace runs, scripts and digits inside words, byte
fallback, NFKC-changing characters, literal whitespace marks, reserved symbols, control
characters, empty documents), and fixtures of real text and of a tokenizer of our recipe that has
learned whitespace-only pieces (import them into a test module to use them)."""

import random

import pytest

ADVERSARIAL = [
    "",
    " ",
    "   ",
    "\t\n \n\n    \t",
    "plain words, punctuation; and (brackets).",
    "    indented code:\n        return x  # two spaces before the comment   ",
    "trailing run         ",
    "         leading run",
    "mixedЖscriptsinsideОдномword and 中文mixed with English字",
    "digits glued: abc123def 4.5e6 v2.0.1 0x1F 2024年12月 ١٢٣ ①②",
    "byte fallback: 🙂🙃 \U0001F9EC \uE000 \U000F0000 ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "NFKC-changing: ﬁ ﬂ ① Ｆｕｌｌｗｉｄｔｈ ㎏ ½ Å Å ｶﾀｶﾅ \u3000ideographic\u3000space",
    "literal marks: a\u2581 b \u2581\u2581c \u2581 d\u2581",
    "reserved <|reserved_0|>glued<|reserved_1|> <|reserved_2|>  <|reserved_3|>",
    "control chars \x01 and \x00 inside",
    "combining: e\u0301 a\u0308\u0308 \u0301alone",
    "عربي مع English و 123",
    "😀" * 40 + " " + "x" * 300 + " " + " " * 200 + "end",
]


def random_texts(count: int, seed: int):
    """Words, scripts, digits, punctuation and whitespace runs in random mixtures."""
    rng = random.Random(seed)
    words = ["the", "The", "statement", "for", "loop", "Здравствуйте", "城市", "市场", "データ",
             "한국어", "naïve", "x1", "42", "3.14", "(", ")", ",", ".", "def", "__init__", "🙂",
             "ﬁle", "①", "\u2581", "<|reserved_0|>", "ǅ", "\u0301"]
    gaps = [" ", " ", " ", "  ", "    ", "\n", "\t", "\n    ", "", "\u3000"]
    return ["".join(rng.choice(words) + rng.choice(gaps) for _ in range(rng.randint(0, 40)))
            for _ in range(count)]


@pytest.fixture(scope="module")
def docs_texts():
    """Python's own documentation (pydoc topics): real text with indented code."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


@pytest.fixture(scope="module")
def docs_tokenizer_model(tmp_path_factory, docs_texts):
    """Our tokenizer recipe (`train_tokenizer`: identity normaliser, no dummy prefix, digits split,
    whitespace-only pieces allowed) on text with indentation, so that it learns pieces of whitespace
    only, the case that rules out cutting inside or after a whitespace run."""
    import json

    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer

    directory = tmp_path_factory.mktemp("docs_tokenizer")
    corpus = directory / "topics.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in docs_texts),
                      encoding="utf-8")
    train_tokenizer([str(corpus)], str(directory / "docs"),
                    TokenizerTrainingConfig(vocab_size=2000, num_threads=1))
    return str(directory / "docs.model")
