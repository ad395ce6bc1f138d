"""Exact per-word cache for SentencePiece BPE encoding.

Why it is exact. SentencePiece BPE (`bpe_model.cc`) splits the normalised text into characters
(user-defined symbols kept whole and frozen), then repeatedly merges the adjacent pair whose
concatenation is a vocabulary piece of the highest score (ties: leftmost). A merge only ever
creates a vocabulary piece, so if no piece contains the characters on both sides of a position,
nothing is ever merged across it, and the text falls apart there into parts that BPE encodes
independently, with the same merges in the same order (the order within a part is the global order
restricted to it). A document's ids are then the concatenation of its parts' ids, which are cached:
on natural text most parts are frequent words, so encoding becomes dictionary look-ups.

Where the boundaries are, from the model's trainer spec (`TrainerInterface::IsValidSentencePiece`)
with `split_by_whitespace` and whitespace as a prefix: the whitespace mark U+2581 (an escaped space)
may appear in a piece only at its start, unless the piece is whitespace only, which
`allow_whitespace_only_pieces` permits (our tokenizer sets it). So no piece contains `x` + U+2581
for a character `x` other than U+2581, and every whitespace run starts a new part. Nothing else is
certain at the whitespace: with whitespace-only pieces, a run of three spaces before a word may
encode as `["▁▁", "▁word"]` or `["▁▁▁", "word"]` depending on the scores, so a run is never cut from
the word after it. The parts are therefore "a whitespace run and the non-whitespace characters that
follow it" (a run at the end is a part of its own). The trainer's finer rules (`split_digits`,
`split_by_unicode_script`) also hold inside a part, and cutting there would give fewer distinct
parts, but finding those cuts costs more Python time per character than it saves (measured in
docs/PERFORMANCE.md), and coarser parts are just as exact.

Checked, not assumed: the rule is taken from the spec only when the model is BPE, escapes spaces,
splits by whitespace with whitespace as a prefix, has no user-defined symbol containing whitespace,
and "▁" is a normal piece or unknown characters fall back to bytes (without either, unknown
characters on both sides of a cut would be merged into one `<unk>`); and every normal and unused
piece of the vocabulary is verified not to contain `x` + U+2581. Otherwise (a unigram model, a
model not made by SentencePiece's trainer, an edited one) the cache is off and encoding is plain
SentencePiece, said once per process with the reason.

Normalisation (NFKC, dummy prefix, extra whitespace removal) runs once per document with the
model's own normaliser; parts are encoded by a copy of the model whose normaliser is the identity,
so nothing is normalised twice. For an identity normaliser (ours), which only escapes spaces, that
is a `str.replace` and the model itself encodes the parts.

Memory: the cache holds at most `max_bytes` (estimated from the sizes of its keys, values and dict
slots) in two generations of `max_bytes / 2`: when the current one is full it becomes the old one
(the previous old one is dropped), and parts found in the old one move back into the current one,
so frequent words survive and memory stays bounded on any input size. Parts longer than
`max_part_chars` (long whitespace runs, CJK text without spaces) are encoded but not kept.
"""

import itertools
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import sentencepiece
from sentencepiece import sentencepiece_model_pb2

logger = logging.getLogger(__name__)

WHITESPACE_MARK = "\u2581"
"""SentencePiece's escaped space."""
_DICT_SLOT_BYTES = 104
"""Upper estimate of a dict entry's own cost (hash, key and value pointers, index, growth slack)."""
_reported_fallbacks: set = set()
_NUL, _SOH = "\x00", "\x01"
"""Key characters: NUL stands for a space inside a key, SOH marks a text's first part."""


def plan_cache(model: "sentencepiece_model_pb2.ModelProto") -> Optional[str]:
    """Why the cache cannot be exact for `model`, or None when it is (see the module docstring)."""
    trainer, normalizer = model.trainer_spec, model.normalizer_spec
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        return "not a BPE model"
    if not normalizer.escape_whitespaces:
        return "spaces are not escaped"
    if trainer.treat_whitespace_as_suffix:
        return "whitespace is treated as a suffix"
    if not trainer.split_by_whitespace:
        return "pieces may span whitespace (split_by_whitespace is off)"
    types = {piece.piece: piece.type for piece in model.pieces}
    if types.get(WHITESPACE_MARK) != piece_type.NORMAL and not trainer.byte_fallback:
        return "no byte fallback and no whitespace piece (adjacent <unk>s would merge)"
    spanning = re.compile(f"[^{WHITESPACE_MARK}]{WHITESPACE_MARK}")
    for piece in model.pieces:
        if piece.type == piece_type.USER_DEFINED and (" " in piece.piece
                                                      or WHITESPACE_MARK in piece.piece):
            return f"user-defined symbol {piece.piece!r} contains whitespace"
        if piece.type in (piece_type.NORMAL, piece_type.UNUSED) and spanning.search(piece.piece):
            return f"piece {piece.piece!r} has whitespace after its start"
    return None


def report_fallback(reason: str) -> None:
    """Says once per process (per reason) that encoding is plain SentencePiece, and why."""
    if reason not in _reported_fallbacks:
        _reported_fallbacks.add(reason)
        logger.warning("per-word encoding cache off, plain SentencePiece encoding: %s", reason)


def cache_refusal(model_path: str) -> Optional[str]:
    """`plan_cache` of a model file: why the cache cannot be exact for it, or None."""
    model = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as stream:
        model.ParseFromString(stream.read())
    return plan_cache(model)


def _raw_model(model: "sentencepiece_model_pb2.ModelProto") -> bytes:
    """The model with an identity normaliser: encodes already-normalised parts unchanged."""
    raw = sentencepiece_model_pb2.ModelProto()
    raw.CopyFrom(model)
    spec = raw.normalizer_spec
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    spec.escape_whitespaces = False
    return raw.SerializeToString()


def default_threads(workers: int) -> int:
    """SentencePiece threads per worker so that `workers` processes use the machine's cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


class CachedEncoder:
    """SentencePiece encoding of text batches, ids identical to `processor.encode(texts)`, through
    the exact per-word cache when the model allows it (`self.cached`; else `self.reason`, said
    once per process unless `quiet`: preprocessing workers leave that to the main process).

    Cache keys are cut with `str.replace` and `str.split` (C speed): in the normalised text, whose
    whitespace marks U+2581 that follow another one are first replaced by NUL, splitting at the
    remaining marks gives exactly the parts, minus their first mark; a key `k` stands for the part
    U+2581 + `k` with NUL read as U+2581, and the text's first part is keyed with a leading SOH
    (it has no mark before it). Under the identity normaliser a space and U+2581 give the same ids,
    so a text without U+2581 is cut at its spaces directly. A text that itself contains NUL or SOH
    is encoded plainly.
    """

    def __init__(self, model_proto: bytes, use_cache: bool = True, max_bytes: int = 256 << 20,
                 max_part_chars: int = 256, num_threads: int = 1, quiet: bool = False):
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.num_threads = num_threads
        self.max_bytes = max_bytes
        self.max_part_chars = max_part_chars
        self.parts = self.encoded = self.rotations = 0
        self._current: Dict[str, Tuple[int, ...]] = {}
        self._old: Dict[str, Tuple[int, ...]] = {}
        self._current_bytes = self._old_bytes = 0
        self.cached = False
        self.reason: Optional[str] = "disabled by the caller"
        if not use_cache:
            return
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(model_proto)
        self.reason = plan_cache(model)
        if self.reason is not None:
            if not quiet:
                report_fallback(self.reason)
            return
        spec = model.normalizer_spec
        # The identity normaliser only turns spaces into U+2581: parts are cut from the raw text
        # and the model itself encodes them, with no normalising pass in Python.
        self._normalizes = bool(spec.precompiled_charsmap or spec.add_dummy_prefix
                                or spec.remove_extra_whitespaces)
        self._part_encoder = (sentencepiece.SentencePieceProcessor(model_proto=_raw_model(model))
                              if self._normalizes else self.processor)
        self._ids = tuple(range(self.processor.get_piece_size()))  # one int object per id
        self.cached = True

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "CachedEncoder":
        with open(path, "rb") as stream:
            return cls(stream.read(), **kwargs)

    @property
    def cache_bytes(self) -> int:
        """Estimated bytes held by the cache (both generations)."""
        return self._current_bytes + self._old_bytes

    def __len__(self) -> int:
        return len(self._current) + len(self._old)

    def encode_plain(self, texts: Sequence[str]) -> List[List[int]]:
        """SentencePiece's own encoding (the reference the cache must equal)."""
        return self.processor.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def split(self, text: str) -> List[str]:
        """The parts of `text` that BPE encodes independently, in order, normalised (spaces are
        U+2581)."""
        keys = self._keys(text)
        if keys is None:
            raise ValueError("text contains NUL or SOH; it is encoded without the cache")
        return [part for part in map(self._part_of_key, keys) if part]

    def _keys(self, text: str) -> Optional[List[str]]:
        if _NUL in text or _SOH in text:
            return None
        mark = WHITESPACE_MARK
        if self._normalizes:
            text = self.processor.normalize(text)
        elif mark in text:
            # a literal U+2581 is a whitespace mark for BPE just like an escaped space
            text = text.replace(" ", mark)
        else:
            # the identity normaliser turns spaces into marks and nothing else: cut at spaces
            # (a key means the same ids with either), sparing a copy of the text
            mark = " "
        # Every mark that follows a mark becomes NUL ("__" -> "_NUL" leaves every other one of a
        # longer run; "NUL_" -> "NUL NUL" catches those), so splitting at the remaining marks cuts
        # exactly before each run.
        keys = text.replace(mark + mark, mark + _NUL).replace(_NUL + mark, _NUL + _NUL).split(mark)
        keys[0] = _SOH + keys[0]
        return keys

    @staticmethod
    def _part_of_key(key: str) -> str:
        if key.startswith(_SOH):
            return key[1:]
        return WHITESPACE_MARK + key.replace(_NUL, WHITESPACE_MARK)

    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        """The ids of each text, equal to `encode_plain(texts)`."""
        if not self.cached:
            return self.encode_plain(texts)
        key_lists = [self._keys(text) for text in texts]
        getter = self._current.__getitem__
        chain = itertools.chain.from_iterable
        encoded: List[Optional[List[int]]] = []
        retry = []
        for index, keys in enumerate(key_lists):
            try:
                encoded.append(list(chain(map(getter, keys))))
            except KeyError:  # some parts are new: encoded below, all texts at once
                encoded.append(None)
                retry.append(index)
            except TypeError:  # keys is None: NUL or SOH in the text
                encoded.append(self.encode_plain([texts[index]])[0])
        if retry:
            missing: set = set()
            contains = self._current.__contains__
            for index in retry:
                missing.update(itertools.filterfalse(contains, key_lists[index]))
            self._fill(missing)
            for index in retry:
                encoded[index] = list(chain(map(getter, key_lists[index])))
            self._forget_long(missing)
        self.parts += sum(map(len, filter(None, key_lists)))
        if self._current_bytes > self.max_bytes // 2:
            self._rotate()
        return encoded

    def _fill(self, missing: set) -> None:
        """Puts every key of `missing` into the current generation: moved from the old one when
        it is there, else its part is encoded (all at once, with SentencePiece's threads)."""
        current, old, ids = self._current, self._old, self._ids
        to_encode = []
        for key in missing:
            value = old.get(key)
            if value is None:
                to_encode.append(key)
            else:
                current[key] = value
                self._current_bytes += _entry_bytes(key, value)
        self.encoded += len(to_encode)
        encoded = self._part_encoder.encode([self._part_of_key(key) for key in to_encode],
                                            out_type=int, num_threads=self.num_threads)
        for key, part_ids in zip(to_encode, encoded):
            value = tuple(map(ids.__getitem__, part_ids))
            current[key] = value
            if len(key) <= self.max_part_chars:
                self._current_bytes += _entry_bytes(key, value)

    def _forget_long(self, keys: set) -> None:
        for key in keys:
            if len(key) > self.max_part_chars:
                del self._current[key]

    def _rotate(self) -> None:
        self._old, self._old_bytes = self._current, self._current_bytes
        self._current, self._current_bytes = {}, 0
        self.rotations += 1

    def stats(self) -> Dict[str, float]:
        """Parts looked up, distinct parts SentencePiece encoded, the share served from the cache,
        entries and estimated bytes held, generation changes."""
        return {"cached": self.cached, "parts": self.parts, "encoded": self.encoded,
                "hit_rate": 1.0 - self.encoded / max(1, self.parts), "entries": len(self),
                "bytes": self.cache_bytes, "rotations": self.rotations}


def _entry_bytes(unit: str, value: Tuple[int, ...]) -> int:
    # The ints are shared (one object per vocabulary id), so the value costs its tuple only.
    return sys.getsizeof(unit) + sys.getsizeof(value) + _DICT_SLOT_BYTES
