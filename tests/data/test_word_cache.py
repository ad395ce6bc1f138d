"""The per-word encoding cache gives SentencePiece's own ids, on adversarial text and for every
normaliser, falls back (said once) where it cannot be exact, and keeps its memory bound."""

import logging
import random
import sys

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from megatron_conan.data import word_cache
from megatron_conan.data.word_cache import CachedEncoder, plan_cache
from tests.data.adversarial import (  # noqa: F401  (fixtures)
    ADVERSARIAL,
    docs_texts,
    docs_tokenizer_model,
    random_texts,
)

def _train(tmp_path_factory, name, corpus, **options):
    directory = tmp_path_factory.mktemp(name)
    lines = [text for text in corpus if text.strip()] * 3
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(directory / name), vocab_size=1200,
        character_coverage=0.98, minloglevel=2, num_threads=1, **options)
    return str(directory / name) + ".model"


@pytest.fixture(scope="module")
def training_corpus(corpus_dir):
    import json

    with open(corpus_dir / "mixed.jsonl", encoding="utf-8") as stream:
        texts = [json.loads(line)["text"] for line in stream][:300]
    return texts + random_texts(300, seed=1)


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, training_corpus):
    """Models made with other specs: SentencePiece's defaults (NFKC, dummy prefix, extra
    whitespace removed), NFKC without byte fallback, identity with a dummy prefix and whitespace
    pieces, and a unigram model."""
    return {
        "nfkc_defaults": _train(tmp_path_factory, "nfkc", training_corpus, model_type="bpe",
                                byte_fallback=True),
        "nfkc_no_byte_fallback": _train(tmp_path_factory, "nofb", training_corpus,
                                        model_type="bpe"),
        "identity_dummy_prefix": _train(
            tmp_path_factory, "dummy", training_corpus, model_type="bpe", byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["<|reserved_0|>"]),
        "unigram": _train(tmp_path_factory, "unigram", training_corpus, model_type="unigram"),
    }


def _assert_exact(encoder, texts):
    cached = encoder.encode(texts)
    plain = encoder.encode_plain(texts)
    for text, got, want in zip(texts, cached, plain):
        assert got == want, repr(text)


@pytest.mark.parametrize("model", ["tokenizer_model", "docs_tokenizer_model"])
def test_our_tokenizer_is_cached_and_exact_on_adversarial_text(request, model, docs_texts):
    encoder = CachedEncoder.from_file(request.getfixturevalue(model))
    assert encoder.cached and encoder.reason is None
    texts = ADVERSARIAL + random_texts(1500, seed=0) + docs_texts
    for start in range(0, len(texts), 100):  # several batches: later ones hit the cache
        _assert_exact(encoder, texts[start:start + 100])
    _assert_exact(encoder, texts)  # everything again, now from the cache
    stats = encoder.stats()
    assert stats["hit_rate"] > 0.5 and stats["encoded"] < stats["parts"]


def test_whitespace_only_pieces_are_learned_and_runs_stay_whole(docs_tokenizer_model):
    encoder = CachedEncoder.from_file(docs_tokenizer_model)
    processor = encoder.processor
    runs = [piece for piece in map(processor.id_to_piece, range(processor.get_piece_size()))
            if len(piece) > 1 and set(piece) == {"\u2581"}]
    assert len(runs) >= 3
    # where a run meets a word, BPE may give the run's last space to either side: cutting at
    # every space (not only before runs) would be wrong
    text = "if x:\n        return        y"
    cut_at_every_space = [token for index, piece in enumerate(text.split(" "))
                          for token in processor.encode(("\u2581" if index else "") + piece,
                                                        out_type=int)]
    assert cut_at_every_space != processor.encode(text, out_type=int)
    assert encoder.encode([text]) == [processor.encode(text, out_type=int)]


def test_parts_concatenate_to_the_normalised_text(tokenizer_model):
    encoder = CachedEncoder.from_file(tokenizer_model)
    for text in ADVERSARIAL + random_texts(200, seed=2):
        if "\x00" in text or "\x01" in text:
            with pytest.raises(ValueError, match="NUL or SOH"):
                encoder.split(text)
            continue
        parts = encoder.split(text)
        assert "".join(parts) == text.replace(" ", "\u2581")
        # every part but the first starts with its whitespace run, and no run is cut in two
        assert all(part.startswith("\u2581") for part in parts[1:])
        assert not any(part.endswith("\u2581") for part in parts[:-1])


@pytest.mark.parametrize("name", ["nfkc_defaults", "identity_dummy_prefix"])
def test_other_normalisers_are_cached_and_exact(other_models, name):
    encoder = CachedEncoder.from_file(other_models[name])
    assert encoder.cached and encoder._normalizes, encoder.reason  # the normalising path
    texts = ADVERSARIAL + random_texts(800, seed=3)
    _assert_exact(encoder, texts)
    _assert_exact(encoder, texts)


@pytest.mark.parametrize("name,reason", [("unigram", "not a BPE model"),
                                         ("nfkc_no_byte_fallback", None)])
def test_models_the_rule_does_not_cover_fall_back_or_stay_exact(other_models, name, reason):
    encoder = CachedEncoder.from_file(other_models[name])
    if reason is None:  # no byte fallback, but the whitespace mark is a piece: still exact
        assert encoder.cached, encoder.reason
    else:
        assert not encoder.cached and reason in encoder.reason
    _assert_exact(encoder, ADVERSARIAL + random_texts(300, seed=4))


def test_a_piece_spanning_whitespace_turns_the_cache_off_said_once(tokenizer_model, caplog):
    model = sentencepiece_model_pb2.ModelProto()
    with open(tokenizer_model, "rb") as stream:
        model.ParseFromString(stream.read())
    assert plan_cache(model) is None
    piece = model.pieces.add()
    piece.piece, piece.score, piece.type = "e\u2581t", 0.0, piece.NORMAL  # "e t" as one piece
    edited = model.SerializeToString()
    assert "has whitespace after its start" in plan_cache(model)
    word_cache._reported_fallbacks.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_conan.data.word_cache"):
        encoders = [CachedEncoder(edited) for _ in range(3)]
    assert not any(encoder.cached for encoder in encoders)
    assert sum("cache off" in record.message for record in caplog.records) == 1
    # the edited model really merges across the space, which cutting before it would miss
    span_id = len(model.pieces) - 1
    assert encoders[0].processor.encode("e t", out_type=int) == [span_id]
    assert encoders[0].encode(["e t", "one two"]) == encoders[0].encode_plain(["e t", "one two"])


def test_memory_stays_within_the_bound_and_results_stay_exact(tokenizer_model):
    bound, batch_allowance = 256 << 10, 64 << 10  # a batch of 200 new words adds under 64 KiB
    encoder = CachedEncoder.from_file(tokenizer_model, max_bytes=bound)
    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyzабвгдежзий"
    for _ in range(150):  # ~30k distinct words, far more than the bound holds
        texts = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 12)))
                          for _ in range(100)) for _ in range(2)]
        _assert_exact(encoder, texts)
        assert encoder.cache_bytes <= bound + batch_allowance
        held = sum(sys.getsizeof(generation) + sum(
            sys.getsizeof(key) + sys.getsizeof(value) for key, value in generation.items())
            for generation in (encoder._current, encoder._old))
        assert held <= encoder.cache_bytes  # the estimate bounds what the dicts really hold
    assert encoder.rotations >= 3


def test_long_parts_are_encoded_but_not_kept(tokenizer_model):
    encoder = CachedEncoder.from_file(tokenizer_model, max_part_chars=10)
    long_word = "x" * 50
    _assert_exact(encoder, [f"short {long_word} words"])
    assert all(len(key) <= 10 for key in encoder._current)


def test_tokenizer_encode_batch_uses_the_cache(tokenizer):
    texts = ADVERSARIAL[:12]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]
    assert tokenizer.encode_batch(texts, num_threads=2) == [tokenizer.encode(t) for t in texts]
    assert tokenizer._cached.cached and tokenizer._cached.parts > 0


def test_the_tool_says_the_fallback_once_for_the_run(other_models, tmp_path):
    import subprocess

    source = tmp_path / "docs.jsonl"
    source.write_text("".join('{"text": "%s"}\n' % text for text in ("one two", "three")),
                      encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, "-m", "megatron_conan.cli.preprocess", "--input",
         str(source), "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
         other_models["unigram"], "--workers", "2", "--no-progress"],
        capture_output=True, text=True, check=True)  # main process and both workers
    assert completed.stderr.count("cache off, plain SentencePiece encoding: not a BPE") == 1
