"""Reading JSONL inputs (plain, .gz, .zst) in line batches, and accounting for bad lines.

Every line read is either turned into an output record or counted as one `BadLineKind`, with its
file and 1-based line number; nothing is dropped silently. This module imports neither torch nor
megatron, so spawned preprocessing workers start fast.
"""

import dataclasses
import enum
import gzip
import io
import json
from typing import Any, Dict, Iterator, List, Optional, Sequence

from megatron_conan.errors import DataError


class BadLineKind(str, enum.Enum):
    """Why a line produced no output record."""

    INVALID_UTF8 = "invalid_utf8"
    """Bytes that are not UTF-8, or a JSON string escape that is not encodable (lone surrogate)."""
    MALFORMED_JSON = "malformed_json"
    """Not parseable as JSON, or JSON that is not an object."""
    MISSING_FIELD = "missing_field"
    """A required field is absent or null."""
    NON_STRING_FIELD = "non_string_field"
    """A field has the wrong type (a text field that is not a string, a score that is not a number)."""
    EMPTY_TEXT = "empty_text"
    """A required text field is empty or whitespace only."""
    TOO_LONG = "too_long"
    """The raw line exceeds the configured maximum number of bytes."""
    BLANK_LINE = "blank_line"
    """A line with nothing but whitespace."""
    INVALID_VALUE = "invalid_value"
    """A field has a value outside its domain (an unknown task name, for example)."""


class BadLineError(ValueError):
    """Raised by record parsers; carries the kind and a short description."""

    def __init__(self, kind: BadLineKind, detail: str):
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class BadLine:
    """One bad line: where it is and why it was rejected."""

    path: str
    line_number: int
    kind: BadLineKind
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_number}: {self.kind.value}: {self.detail}"


class StrictModeError(DataError):
    """Raised in strict mode at the first bad line."""

    def __init__(self, bad_line: BadLine):
        super().__init__(f"bad input (strict mode): {bad_line}")
        self.bad_line = bad_line


class BadLineReport:
    """Counts bad lines per kind and keeps the first `max_examples` locations of each kind."""

    def __init__(self, max_examples: int = 10):
        self.max_examples = max_examples
        self.counts: Dict[BadLineKind, int] = {}
        self.examples: Dict[BadLineKind, List[BadLine]] = {}

    def add(self, bad_line: BadLine) -> None:
        self.counts[bad_line.kind] = self.counts.get(bad_line.kind, 0) + 1
        kept = self.examples.setdefault(bad_line.kind, [])
        if len(kept) < self.max_examples:
            kept.append(bad_line)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def count(self, kind: BadLineKind) -> int:
        return self.counts.get(kind, 0)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "total": self.total,
            "counts": {kind.value: count for kind, count in sorted(self.counts.items())},
            "examples": {kind.value: [str(bad) for bad in bads]
                         for kind, bads in sorted(self.examples.items())},
        }

    def format(self) -> str:
        if not self.counts:
            return "bad lines: none"
        lines = [f"bad lines: {self.total}"]
        for kind, count in sorted(self.counts.items()):
            lines.append(f"  {kind.value}: {count}")
            lines.extend(f"    {bad}" for bad in self.examples[kind])
            if count > len(self.examples[kind]):
                lines.append(f"    ... {count - len(self.examples[kind])} more")
        return "\n".join(lines)


def open_binary(path: str) -> io.BufferedIOBase:
    """Opens a plain, gzip (.gz) or zstandard (.zst) file for reading bytes."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


UTF8_BOM = b"\xef\xbb\xbf"
"""A byte-order mark some editors (and Windows tools) put at the start of UTF-8 files."""
DEFAULT_MAX_LINE_BYTES = 16 << 20
"""The longest line any reader of this module holds in memory (bytes, terminator excluded); a
longer one is skipped to its end and reported as `too_long`."""
_SKIP_CHUNK_BYTES = 1 << 20


class OverlongLine(bytes):
    """Stands for a line longer than the reader's limit, which was skipped, not held: the bytes
    are empty, `size` is how many the line had (terminator included)."""

    size: int = 0

    @classmethod
    def of(cls, size: int) -> "OverlongLine":
        line = cls()
        line.size = size
        return line


def _skip_rest_of_line(stream, read: int, line: bytes) -> int:
    """Read past the end of an over-long line in bounded chunks; returns its total size."""
    while line and not line.endswith(b"\n"):
        line = stream.readline(_SKIP_CHUNK_BYTES)
        read += len(line)
    return read


def _bounded_lines(stream, limit: int) -> Iterator[bytes]:
    cap = limit + 2  # the terminator ("\r\n" at most) does not count towards the limit
    while True:
        line = stream.readline(cap)
        if not line:
            return
        if len(line) < cap or line.endswith(b"\n"):
            yield line
        else:
            yield OverlongLine.of(_skip_rest_of_line(stream, len(line), line))


def iter_file_lines(path: str, max_line_bytes: Optional[int] = None) -> Iterator[bytes]:
    """The raw lines of `path` (plain, .gz or .zst), terminators kept, without a UTF-8 byte-order
    mark at the start of the file (a BOM anywhere else is data, and invalid JSON). A line over
    `max_line_bytes` (default :data:`DEFAULT_MAX_LINE_BYTES`) is never held whole: it comes as an
    :class:`OverlongLine`, which :func:`parse_json_object` reports as `too_long`."""
    limit = max_line_bytes or DEFAULT_MAX_LINE_BYTES
    with open_binary(path) as stream:
        lines = _bounded_lines(stream, limit + len(UTF8_BOM))
        first = next(lines, b"")
        if first.startswith(UTF8_BOM):
            first = first[len(UTF8_BOM):]
        if first or isinstance(first, OverlongLine):
            yield first
        yield from _bounded_lines(stream, limit)


@dataclasses.dataclass
class LineBatch:
    """Consecutive raw lines of one input file; `first_line_number` is 1-based."""

    path: str
    first_line_number: int
    lines: List[bytes]

    @property
    def num_bytes(self) -> int:
        return sum(len(line) for line in self.lines)


def read_line_batches(paths: Sequence[str], max_lines: int = 1024, max_bytes: int = 1 << 20,
                      max_line_bytes: Optional[int] = None) -> Iterator[LineBatch]:
    """Yields the lines of `paths`, in order, in batches of at most `max_lines` lines or about
    `max_bytes` bytes. Line terminators are kept (they do not count towards line size limits); a
    line over `max_line_bytes` comes as an :class:`OverlongLine` (:func:`iter_file_lines`)."""
    for path in paths:
        batch: List[bytes] = []
        batch_bytes = 0
        first = 1
        for line_number, line in enumerate(iter_file_lines(path, max_line_bytes), start=1):
            batch.append(line)
            batch_bytes += len(line)
            if len(batch) >= max_lines or batch_bytes >= max_bytes:
                yield LineBatch(path, first, batch)
                batch, batch_bytes, first = [], 0, line_number + 1
        if batch:
            yield LineBatch(path, first, batch)


def _strip_newline(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
    return raw


def parse_json_object(raw: bytes, max_line_bytes: Optional[int]) -> Dict[str, Any]:
    """Decodes one raw JSONL line into a dict, or raises `BadLineError`."""
    if isinstance(raw, OverlongLine):
        raise BadLineError(BadLineKind.TOO_LONG, f"{raw.size} bytes > limit {max_line_bytes or DEFAULT_MAX_LINE_BYTES}"
                           f" (skipped unread)")
    raw = _strip_newline(raw)
    if max_line_bytes is not None and len(raw) > max_line_bytes:
        raise BadLineError(BadLineKind.TOO_LONG, f"{len(raw)} bytes > limit {max_line_bytes}")
    if not raw.strip():
        raise BadLineError(BadLineKind.BLANK_LINE, "blank line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadLineError(BadLineKind.INVALID_UTF8,
                           f"byte {error.start}: {error.reason}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadLineError(BadLineKind.MALFORMED_JSON, f"{error.msg} at column {error.colno}") from None
    except RecursionError:
        raise BadLineError(BadLineKind.MALFORMED_JSON, "nested too deeply") from None
    if not isinstance(value, dict):
        raise BadLineError(BadLineKind.MALFORMED_JSON, f"a JSON {type(value).__name__}, not an object")
    return value


def require_text(record: Dict[str, Any], key: str, allow_empty: bool = False) -> str:
    """The string at `record[key]`, or raises `BadLineError` (missing, non-string, empty,
    unencodable)."""
    value = record.get(key)
    if value is None:
        raise BadLineError(BadLineKind.MISSING_FIELD, f"field {key!r} missing")
    if not isinstance(value, str):
        raise BadLineError(BadLineKind.NON_STRING_FIELD,
                           f"field {key!r} is a {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise BadLineError(BadLineKind.EMPTY_TEXT, f"field {key!r} is empty")
    return value


def require_text_list(record: Dict[str, Any], key: str, required: bool = False) -> List[str]:
    """The list of non-empty strings at `record[key]` (absent gives [] unless `required`)."""
    value = record.get(key)
    if value is None:
        if required:
            raise BadLineError(BadLineKind.MISSING_FIELD, f"field {key!r} missing")
        return []
    if not isinstance(value, list):
        raise BadLineError(BadLineKind.NON_STRING_FIELD,
                           f"field {key!r} is a {type(value).__name__}, not a list of strings")
    for position, item in enumerate(value):
        if not isinstance(item, str):
            raise BadLineError(BadLineKind.NON_STRING_FIELD,
                               f"{key}[{position}] is a {type(item).__name__}, not a string")
        if not item.strip():
            raise BadLineError(BadLineKind.EMPTY_TEXT, f"{key}[{position}] is empty")
    return value


def check_encodable(text: str, field: str) -> None:
    """JSON escapes can produce lone surrogates, which no tokenizer can encode as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadLineError(BadLineKind.INVALID_UTF8,
                           f"field {field!r}: unencodable character at {error.start}") from None
