"""The project's SentencePiece tokenizer: training it, and the class every component shares.

`ConanTokenizer` implements megatron-core's tokenizer interface as `GPTDataset` uses it
(`MegatronTokenizerBase`: `tokenize`, `detokenize`, `vocab`, `vocab_size`, plus `eod`, `pad`,
`bos`, `eos` and `unique_identifiers` for the dataset cache hash) and the legacy one's `inv_vocab`.

Model layout (fixed ids, so every stage and converter agrees):
    0 <pad>, 1 <unk>, 2 <s> (bos), 3 </s> (eos = eod), then the reserved user symbols
    <|reserved_0|> ... <|reserved_{n-1}|>, then 256 byte-fallback pieces <0x00>..<0xFF>, then the
    learned BPE pieces.
Normalisation is the identity (no NFKC, whitespace kept as is) and no dummy prefix is added, so
encoding is faithful to the bytes and concatenating encoded parts behaves predictably.
"""

import dataclasses
import hashlib
import logging
import os
import random
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence

import sentencepiece

from megatron.core.tokenizers import MegatronTokenizerBase
from megatron_conan import atomic_write
from megatron_conan.data.jsonl import (
    BadLine,
    BadLineError,
    BadLineKind,
    BadLineReport,
    OverlongLine,
    check_encodable,
    iter_file_lines,
    parse_json_object,
    require_text,
)
from megatron_conan.data.word_cache import CachedEncoder
from megatron_conan.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"


def reserved_tokens(count: int) -> List[str]:
    """User-defined symbols kept for instruction markup (always single tokens)."""
    return [f"<|reserved_{index}|>" for index in range(count)]


@dataclasses.dataclass
class TokenizerTrainingConfig:
    """How `train_tokenizer` builds a SentencePiece model."""

    vocab_size: int = 150_000
    """Total pieces, specials and byte-fallback pieces included (150,000 in the 1.4B recipe)."""
    character_coverage: float = 0.9995
    """Share of characters covered by pieces; the rest fall back to bytes. 0.9995 suits CJK."""
    num_reserved: int = 8
    """How many <|reserved_i|> symbols to add after the four special tokens."""
    json_key: str = "text"
    """Field of JSONL inputs holding the text; files not ending in .jsonl[.gz|.zst] are plain text,
    one sample per line."""
    max_sentences: int = 2_000_000
    """Size of the uniform sample of lines (reservoir sampling over all inputs)."""
    max_sentence_length: int = 16384
    """Longest line (bytes) SentencePiece trains on; longer lines are cut there as they are read, so
    the sample never holds more."""
    seed: int = 1234
    """Seed of the sample."""
    num_threads: int = max(1, os.cpu_count() or 1)
    """SentencePiece trainer threads."""
    max_bad_line_examples: int = 10
    """Bad input lines kept per kind in the report."""

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + 4 + self.num_reserved + 1:
            raise ConfigError(f"vocab_size={self.vocab_size} leaves no room beyond the byte-fallback "
                             f"and special pieces")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"character_coverage={self.character_coverage} must be in (0, 1]")
        if self.num_reserved < 0:
            raise ConfigError("num_reserved must be >= 0")
        if self.max_sentences < 1:
            raise ConfigError("max_sentences must be >= 1")


def _is_jsonl(path: str) -> bool:
    return any(path.endswith(suffix) for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json"))


def _cut(text: str, max_bytes: Optional[int]) -> str:
    """`text` cut to `max_bytes` of UTF-8 (at a character boundary)."""
    if max_bytes is None or len(text) * 4 <= max_bytes:
        return text
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def iter_training_lines(paths: Sequence[str], json_key: str, report: BadLineReport,
                        max_bytes: Optional[int] = None) -> Iterator[str]:
    """Non-empty lines of the texts in `paths` (JSONL records or plain-text lines), each cut to
    `max_bytes` of UTF-8 here, before anyone holds it; bad lines (a file line over the reader's
    limit included) are counted in `report`."""
    for path in paths:
        jsonl = _is_jsonl(path)
        for line_number, raw in enumerate(iter_file_lines(path), start=1):
            try:
                if jsonl or isinstance(raw, OverlongLine):
                    text = require_text(parse_json_object(raw, None), json_key)
                else:
                    text = raw.decode("utf-8")
                check_encodable(text, json_key)
            except BadLineError as error:
                report.add(BadLine(path, line_number, error.kind, error.detail))
                continue
            except UnicodeDecodeError as error:
                report.add(BadLine(path, line_number, BadLineKind.INVALID_UTF8,
                                   f"byte {error.start}: {error.reason}"))
                continue
            for piece in text.split("\n"):
                if piece.strip():
                    yield _cut(piece, max_bytes)


def sample_lines(lines: Iterator[str], max_sentences: int, seed: int) -> List[str]:
    """A uniform sample of at most `max_sentences` lines (reservoir sampling), in stream order."""
    rng = random.Random(seed)
    reservoir: List[tuple] = []
    for index, line in enumerate(lines):
        if index < max_sentences:
            reservoir.append((index, line))
        else:
            slot = rng.randint(0, index)
            if slot < max_sentences:
                reservoir[slot] = (index, line)
    reservoir.sort()
    return [line for _, line in reservoir]


def train_tokenizer(inputs: Sequence[str], model_prefix: str,
                    config: Optional[TokenizerTrainingConfig] = None) -> BadLineReport:
    """Trains a BPE SentencePiece model on a sample of `inputs`; writes `<model_prefix>.model`
    and `.vocab` atomically. Returns the report of bad input lines skipped."""
    config = config or TokenizerTrainingConfig()
    report = BadLineReport(config.max_bad_line_examples)
    sample = sample_lines(iter_training_lines(inputs, config.json_key, report, config.max_sentence_length),
                          config.max_sentences, config.seed)
    if not sample:
        raise DataError(f"no usable text in {list(inputs)}")
    logger.info("training a %d-piece tokenizer on %d sampled lines", config.vocab_size, len(sample))
    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    with atomic_write.FileSet([model_prefix + ".vocab", model_prefix + ".model"]) as files:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_prefix=files.staging_prefix(model_prefix),
            model_type="bpe",
            vocab_size=config.vocab_size,
            character_coverage=config.character_coverage,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=PAD_PIECE, unk_piece=UNK_PIECE, bos_piece=BOS_PIECE, eos_piece=EOS_PIECE,
            user_defined_symbols=reserved_tokens(config.num_reserved),
            max_sentence_length=config.max_sentence_length,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            train_extremely_large_corpus=config.vocab_size > 100_000,
            num_threads=config.num_threads,
            minloglevel=2,
        )
        files.commit()
    return report


class ConanTokenizer(MegatronTokenizerBase):
    """SentencePiece tokenizer shared by the trainers, the data tools and the converters."""

    WORD_CACHE_BYTES = 64 << 20
    """Memory bound of the word cache behind `encode_batch`."""

    def __init__(self, model_path: str):
        super().__init__(model_path, config={"library": "sentencepiece"})
        with open(model_path, "rb") as stream:
            self._model_proto = stream.read()
        self._load()

    def _load(self) -> None:
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=self._model_proto)
        self._vocab: Optional[Dict[str, int]] = None
        self._cached: Optional[CachedEncoder] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_processor"], state["_vocab"], state["_cached"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        """What identifies this tokenizer in megatron-core's dataset cache hash: its content, not
        its path, so a cache is reused across machines and invalidated by a changed model."""
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"),
             ("model_sha256", hashlib.sha256(self._model_proto).hexdigest()),
             ("vocab_size", str(self.vocab_size))])

    # -- encoding --
    def encode(self, text: str) -> List[int]:
        return self._processor.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        """`[encode(text) for text in texts]`, through the exact per-word cache of
        `word_cache.CachedEncoder` (64 MiB at most per tokenizer object)."""
        if self._cached is None:
            self._cached = CachedEncoder(self._model_proto, max_bytes=self.WORD_CACHE_BYTES)
        self._cached.num_threads = num_threads
        return self._cached.encode(list(texts))

    def tokenize(self, text: str) -> List[int]:
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(token) for token in ids])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("ConanTokenizer has no chat template; SFT prompts are built by "
                                  "megatron_conan.preprocess.encoders.format_sft_prompt")

    # -- vocabulary --
    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def vocab(self) -> Dict[str, int]:
        if self._vocab is None:
            self._vocab = {self._processor.id_to_piece(index): index
                           for index in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {index: piece for piece, index in self.vocab.items()}

    def piece_to_id(self, piece: str) -> int:
        return self._processor.piece_to_id(piece)

    # -- special tokens --
    @property
    def pad(self) -> int:
        return self._processor.pad_id()

    @property
    def unk(self) -> int:
        return self._processor.unk_id()

    @property
    def bos(self) -> int:
        return self._processor.bos_id()

    @property
    def eos(self) -> int:
        return self._processor.eos_id()

    @property
    def eod(self) -> int:
        return self.eos

    @property
    def pad_id(self) -> int:
        return self.pad

    @property
    def eod_id(self) -> int:
        return self.eod

    @property
    def model_path(self) -> str:
        return self.path
