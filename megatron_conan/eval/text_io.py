"""Reading texts and records for the evaluation tools, and writing their outputs atomically.

Inputs are JSONL (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one object per line) or plain text
(anything else: one text per line). A bad line (malformed JSON, invalid UTF-8, a missing, empty or
non-string field, a blank line) stops the tool with an error naming the file and line: an embedding
file whose rows no longer match the input lines would be silently wrong.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterator, List, Tuple

import numpy

from megatron_conan import atomic_write
from megatron_conan.data.jsonl import (
    DEFAULT_MAX_LINE_BYTES,
    BadLineError,
    OverlongLine,
    iter_file_lines,
    parse_json_object,
    require_text,
)
from megatron_conan.errors import DataError, InputError
from megatron_conan.outputs import check_file_target

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def existing_file(path: str, what: str = "input") -> str:
    """`path`, or an InputError when it is missing or a directory."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} does not exist")
    return path


def iter_jsonl_records(path: str, skip_blank: bool = False,
                       what: str = "input") -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(1-based line number, object) for every line of a JSONL file (blank ones skipped with
    `skip_blank`, else an error). Lines are read with the reader's bound (``data/jsonl.py``)."""
    for number, raw in enumerate(iter_file_lines(existing_file(path, what)), start=1):
        if skip_blank and not isinstance(raw, OverlongLine) and not raw.strip():
            continue
        try:
            yield number, parse_json_object(raw, None)
        except BadLineError as error:
            raise DataError(f"{path}:{number}: {error}") from None


def text_line(raw: bytes, path: str, number: int) -> str:
    """One line of a plain-text file, decoded; an over-long or non-UTF-8 line is an error naming it."""
    if isinstance(raw, OverlongLine):
        raise DataError(f"{path}:{number}: a line of {raw.size} bytes, over the limit of {DEFAULT_MAX_LINE_BYTES}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}:{number}: invalid UTF-8 at byte {error.start}") from None


def record_text(record: Dict[str, Any], field: str, path: str, number: int) -> str:
    try:
        return require_text(record, field)
    except BadLineError as error:
        raise DataError(f"{path}:{number}: {error}") from None


def read_texts(path: str, text_field: str = "text") -> List[str]:
    """The texts of `path`: the `text_field` of each JSONL record, or each line of a text file."""
    if is_jsonl(path):
        return [record_text(record, text_field, path, number) for number, record in iter_jsonl_records(path)]
    texts = []
    for number, raw in enumerate(iter_file_lines(existing_file(path)), start=1):
        text = text_line(raw, path, number).rstrip("\r\n")
        if not text.strip():
            raise DataError(f"{path}:{number}: blank line (one text per line; blank texts are not embedded)")
        texts.append(text)
    return texts


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Check that `path` can be written (:func:`megatron_conan.outputs.check_file_target`), then call
    ``write(tmp_path)`` for a temporary file that :func:`megatron_conan.atomic_write.file` renames to
    `path`. Whether an existing output may be replaced is the command's check
    (:func:`megatron_conan.outputs.check_output_files`)."""
    check_file_target(path)
    with atomic_write.file(path) as tmp:
        write(tmp)


def save_npy(path: str, array: numpy.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            numpy.save(handle, array)

    write_atomically(path, write)


def save_json(path: str, value: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2, ensure_ascii=False)
            handle.write("\n")

    write_atomically(path, write)
