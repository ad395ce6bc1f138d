"""Which tokenizer made a dataset: the `<prefix>.meta.json` record, and the check before training.

Data tokenized by another tokenizer than the one a run trains with trains silently on the wrong
text (the ids are all valid). So every dataset the preprocessing tool writes (formats `text` and
`sft`; the contrastive store too) carries `<prefix>.meta.json`, written with the `.bin` and renamed
into place before the `.idx` (a dataset is complete, record included, when its `.idx` exists):

    {"format": "megatron_conan.indexed", "version": 1, "kind": "text" | "sft",
     "tokenizer": {"sha256": "<hex of the .model file>", "vocab_size": 32000,
                   "model_file": "conan.model"},
     "dtype": "uint16", "documents": 21389, "sequences": 21389, "tokens": 46812345,
     "inputs": ["/abs/path/a.jsonl", ...]}

A contrastive store's record has `"format": "megatron_conan.contrastive"` and its own fields
beside these (data/README.md). `check_tokenizer(prefix, tokenizer)` raises
`TokenizerMismatchError` when the recorded SHA-256 or vocabulary size differs from the given
tokenizer's; a dataset without a record (written before records existed, or by Megatron-LM's
tools) is accepted with one warning. Merging shards keeps the record and refuses shards made by
different tokenizers.
"""

import hashlib
import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

from megatron_conan import atomic_write
from megatron_conan.errors import DataError

logger = logging.getLogger(__name__)

META_SUFFIX = ".meta.json"
INDEXED_FORMAT = "megatron_conan.indexed"
"""`format` of the record of a text or SFT dataset."""
RECORD_VERSION = 1
_COUNTS = ("documents", "sequences", "tokens")
_warned_unrecorded: set = set()


class TokenizerMismatchError(DataError):
    """A dataset was tokenized by another tokenizer than the one given."""


def meta_path(prefix: str) -> str:
    return prefix + META_SUFFIX


def tokenizer_record(model_path: str) -> Dict[str, Any]:
    """{sha256, vocab_size, model_file} of a SentencePiece model file."""
    import sentencepiece

    with open(model_path, "rb") as stream:
        model = stream.read()
    vocab_size = sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size()
    return {"sha256": hashlib.sha256(model).hexdigest(), "vocab_size": vocab_size,
            "model_file": os.path.basename(model_path)}


def _identity_of(tokenizer) -> Dict[str, Any]:
    """sha256 and vocab_size of a `ConanTokenizer` or of a SentencePiece model path."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer_record(os.fspath(tokenizer))
    identifiers = tokenizer.unique_identifiers
    return {"sha256": identifiers["model_sha256"], "vocab_size": int(tokenizer.vocab_size),
            "model_file": os.path.basename(getattr(tokenizer, "model_path", "") or "")}


def read_record(prefix: str) -> Optional[Dict[str, Any]]:
    """The dataset's record, or None when it has none. A record that is not a JSON object with a
    tokenizer is a DataError naming the file."""
    path = meta_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as stream:
            record = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a JSON dataset record ({error})") from None
    except RecursionError:
        raise DataError(f"{path}: not a JSON dataset record (nested too deeply)") from None
    if not isinstance(record, dict) or not isinstance(recorded_tokenizer(record), dict):
        raise DataError(f"{path}: no tokenizer in the dataset record")
    return record


def recorded_tokenizer(record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The record's tokenizer (contrastive stores of version 1 kept only `tokenizer_sha256`)."""
    if isinstance(record.get("tokenizer"), dict):
        return record["tokenizer"]
    if isinstance(record.get("tokenizer_sha256"), str):
        return {"sha256": record["tokenizer_sha256"]}
    return None


def check_tokenizer(prefix: str, tokenizer) -> Optional[Dict[str, Any]]:
    """Raises `TokenizerMismatchError` unless the dataset at `prefix` was made with `tokenizer`
    (a `ConanTokenizer` or a model path): same SHA-256 of the model file and same vocabulary size.
    A dataset without a record is accepted with one warning. Returns the record (None without).
    A write of the dataset that a crash stopped mid-commit is finished first (``atomic_write``)."""
    atomic_write.finish_interrupted_commits(os.path.dirname(os.path.abspath(prefix)))
    record = read_record(prefix)
    if record is None:
        if prefix not in _warned_unrecorded:
            _warned_unrecorded.add(prefix)
            logger.warning("%s has no tokenizer record (%s): cannot check that it was tokenized "
                           "with this tokenizer", prefix, meta_path(prefix))
        return None
    recorded = recorded_tokenizer(record)
    given = _identity_of(tokenizer)
    vocab = recorded.get("vocab_size")
    if vocab is not None and int(vocab) != given["vocab_size"]:
        raise TokenizerMismatchError(
            f"{prefix} was tokenized with a {vocab}-id tokenizer ({recorded.get('model_file')}), "
            f"the run's tokenizer has {given['vocab_size']} ids ({given['model_file']}): "
            f"re-tokenize the data or use its tokenizer")
    if recorded["sha256"] != given["sha256"]:
        raise TokenizerMismatchError(
            f"{prefix} was tokenized with another tokenizer (model SHA-256 "
            f"{recorded['sha256'][:12]}..., {recorded.get('model_file')}) than the run's "
            f"({given['sha256'][:12]}..., {given['model_file']}): re-tokenize the data or use "
            f"its tokenizer")
    return record


def dataset_record(kind: str, tokenizer: Dict[str, Any], dtype_name: str, documents: int,
                   sequences: int, tokens: int, inputs: Sequence[str]) -> Dict[str, Any]:
    """The record of a text or SFT dataset (see the module docstring)."""
    return {"format": INDEXED_FORMAT, "version": RECORD_VERSION, "kind": kind,
            "tokenizer": tokenizer, "dtype": dtype_name, "documents": documents,
            "sequences": sequences, "tokens": tokens,
            "inputs": [os.path.abspath(path) for path in inputs]}


def write_record(path: str, record: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(record, stream, indent=2, ensure_ascii=False)
        stream.write("\n")


def merged_record(prefixes: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The record of the concatenation of `prefixes`: counts summed, inputs joined. None when no
    shard has one; a DataError when only some have one, when tokenizers or kinds differ, or for
    contrastive stores (their example index cannot be concatenated this way)."""
    records = [read_record(prefix) for prefix in prefixes]
    present = [prefix for prefix, record in zip(prefixes, records) if record is not None]
    if not present:
        return None
    if len(present) != len(prefixes):
        missing = [prefix for prefix, record in zip(prefixes, records) if record is None]
        raise DataError(f"cannot merge: {present[0]} has a tokenizer record ({META_SUFFIX}) but "
                        f"{missing[0]} has none, so the merged data's tokenizer is unknown")
    first = records[0]
    merged: Dict[str, Any] = dict(first)
    merged["inputs"] = []
    for count in _COUNTS:
        merged[count] = 0
    for prefix, record in zip(prefixes, records):
        if record.get("format") != INDEXED_FORMAT:
            raise DataError(f"cannot merge {prefix}: a {record.get('format')} dataset, not a "
                            f"text or SFT one")
        if recorded_tokenizer(record)["sha256"] != recorded_tokenizer(first)["sha256"]:
            raise DataError(f"cannot merge: {prefixes[0]} and {prefix} were tokenized with "
                            f"different tokenizers")
        if record.get("kind") != first.get("kind"):
            raise DataError(f"cannot merge: {prefixes[0]} is {first.get('kind')} data, {prefix} "
                            f"is {record.get('kind')}")
        for count in _COUNTS:
            merged[count] += int(record.get(count, 0))
        merged["inputs"].extend(record.get("inputs", []))
    return merged

