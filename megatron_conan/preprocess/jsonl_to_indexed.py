"""JSONL (plain, .gz, .zst) -> megatron-core indexed dataset, with parallel workers.

`preprocess_jsonl(PreprocessConfig(...))` is what `tools/preprocess_data.py` calls. Formats:
- `text` (pretraining): one document per line, `record[json_key]` tokenized, EOD appended, one
  sequence per document (what `GPTDataset` reads).
- `sft`: `{"instruction", "input"?, "output"}` -> one document of two sequences, the prompt ids
  and the output ids + EOD (read by `megatron_conan.data.sft.SFTDataset`).
- `contrastive`: written by `megatron_conan.preprocess.contrastive_tokenize` on top of `run_to_indexed`
  (this module does not know that format's store; the dependency points one way).

This path imports neither torch nor megatron-core (tests/data/test_indexed.py checks):
workers start in a fraction of a second, and the pool starts before the main process does
anything else.
"""

import dataclasses
import json
import logging
import os
import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy

from megatron_conan import atomic_write
from megatron_conan.data.indexed import (
    IndexedDatasetWriter,
    parse_dtype,
    sigterm_raises_system_exit,
)
from megatron_conan.data.jsonl import (
    DEFAULT_MAX_LINE_BYTES,
    BadLineReport,
    LineBatch,
    StrictModeError,
    read_line_batches,
)
from megatron_conan.data.provenance import (
    META_SUFFIX,
    dataset_record,
    tokenizer_record,
    write_record,
)
from megatron_conan.data.word_cache import cache_refusal, default_threads, report_fallback
from megatron_conan.errors import ConfigError, DataError
from megatron_conan.preprocess.encoders import (
    ContrastiveExampleEncoder,
    SFTExampleEncoder,
    TextDocumentEncoder,
)
from megatron_conan.preprocess.parallel_encode import EncodedBatch, LineEncoder, encode_batches, start_workers

logger = logging.getLogger(__name__)

FORMATS = ("text", "sft", "contrastive")


@dataclasses.dataclass
class PreprocessConfig:
    """One preprocessing run: inputs -> `<output_prefix>.bin/.idx`."""

    inputs: List[str]
    """JSONL files, plain or compressed (.gz, .zst), read in the order given."""
    output_prefix: str
    """Output path without the .bin/.idx suffix."""
    tokenizer_model: str
    """SentencePiece model file (from tools/train_tokenizer.py)."""
    format: str = "text"
    """`text` (pretraining documents), `sft` (instruction, input, output) or `contrastive` (the
    schema of `megatron_conan.data.contrastive`)."""
    json_key: str = "text"
    """Field holding the document text (format `text`)."""
    workers: int = 1
    """Tokenizing processes; 1 tokenizes in the main process."""
    dtype: str = "auto"
    """Token dtype: `auto` (uint16 below 65,500 ids, else int32), `uint16` or `int32`."""
    max_line_bytes: Optional[int] = DEFAULT_MAX_LINE_BYTES
    """Lines longer than this (bytes, without the newline) are rejected as `too_long`, and never held
    in memory whole (None: the reader's default, 16 MiB)."""
    strict: bool = False
    """Stop at the first bad line (no output is left behind) instead of counting and skipping."""
    max_bad_line_examples: int = 10
    """How many locations of each kind of bad line the report keeps."""
    batch_lines: int = 1024
    """Lines per work item sent to a worker."""
    batch_bytes: int = 1 << 20
    """Bytes per work item (whichever limit is reached first)."""
    progress: bool = True
    """Show a progress bar (docs/s, tokens/s, MB/s) on stderr."""
    instructions: Dict[str, str] = dataclasses.field(default_factory=dict)
    """Format `contrastive`: per task, the instruction of examples without their own; the query
    is tokenized as one string with it (`encoders.format_query`)."""
    max_bad_fraction: float = 0.01
    """A run whose share of bad lines (of all lines read) exceeds this fails with exit status 2
    after its full report; its output is written all the same (`strict` writes none)."""
    verify_sample: int = 0
    """Re-encode this many documents, drawn uniformly at random, with plain SentencePiece before
    the output is committed, and fail on any difference from what was written."""
    verify_seed: int = 1234
    """Seed of the `verify_sample` draw."""
    word_cache: bool = True
    """Encode through the exact per-word cache (`data/word_cache.py`) when the model allows it."""
    cache_mb: int = 256
    """Memory bound of each worker's word cache, MiB."""
    threads: int = 0
    """SentencePiece threads per worker; 0 = the cores divided by `workers` (at least 1)."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one input file is needed")
        for path in self.inputs:
            if os.path.isdir(path):
                raise ConfigError(f"inputs: {path!r} is a directory, not a file")
            if not os.path.isfile(path) and not _is_fifo(path):
                raise ConfigError(f"inputs: no such file {path!r}")
        if not os.path.isfile(self.tokenizer_model):
            raise ConfigError(f"tokenizer_model: no such file {self.tokenizer_model!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.max_line_bytes is not None and self.max_line_bytes < 1:
            raise ConfigError("max_line_bytes must be positive or None")
        if self.batch_lines < 1 or self.batch_bytes < 1:
            raise ConfigError("batch_lines and batch_bytes must be positive")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.verify_sample < 0:
            raise ConfigError(f"verify_sample must be >= 0, got {self.verify_sample}")
        if self.cache_mb < 1:
            raise ConfigError(f"cache_mb must be >= 1, got {self.cache_mb}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: automatic), got {self.threads}")

    @property
    def threads_per_worker(self) -> int:
        return self.threads or default_threads(self.workers)


def dataset_outputs(prefix: str, extra_suffixes: Sequence[str] = ()) -> List[str]:
    """The files a dataset at `prefix` consists of (what ``--overwrite`` may replace): ``.bin``,
    ``.idx`` and the record, plus `extra_suffixes` (a contrastive store's example rows)."""
    return [prefix + suffix for suffix in (".bin", ".idx", META_SUFFIX, *extra_suffixes)]


def _is_fifo(path: str) -> bool:
    import stat

    return os.path.exists(path) and stat.S_ISFIFO(os.stat(path).st_mode)


class EmptyOutputError(DataError):
    """No input line gave a document; nothing is written (megatron-core cannot read an empty
    .bin)."""


class TooManyBadLinesError(DataError):
    """The share of bad lines exceeds `max_bad_fraction` (raised after the report is out)."""


class VerificationError(RuntimeError):
    """`verify_sample` found a document whose stored ids differ from plain SentencePiece's (a bug
    of the word cache: please report it with the document)."""


@dataclasses.dataclass
class PreprocessResult:
    """Counts of one run (also for contrastive tokenization) and its bad-line report."""

    output_prefix: str
    lines: int = 0
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    bad_lines: BadLineReport = dataclasses.field(default_factory=BadLineReport)
    verified: int = 0
    """Documents re-encoded with plain SentencePiece and found identical (`verify_sample`)."""
    written: bool = False
    """Whether the output was committed."""

    @property
    def bad_fraction(self) -> float:
        return self.bad_lines.total / max(1, self.lines)

    def rates(self) -> Dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {"docs_per_s": self.documents / seconds, "tokens_per_s": self.tokens / seconds,
                "mb_per_s": self.bytes / seconds / 1e6}

    def to_dict(self) -> Dict[str, Any]:
        return {"output_prefix": self.output_prefix, "written": self.written,
                "lines": self.lines, "documents": self.documents, "sequences": self.sequences,
                "tokens": self.tokens, "bytes": self.bytes, "seconds": round(self.seconds, 3),
                **{key: round(value, 2) for key, value in self.rates().items()},
                "bad_fraction": self.bad_fraction, "verified": self.verified,
                "bad_lines": self.bad_lines.to_dict()}

    def format(self) -> str:
        rates = self.rates()
        head = (f"wrote {self.output_prefix}.bin/.idx" if self.written
                else f"no output written to {self.output_prefix}")
        verified = f"; {self.verified:,} documents verified" if self.verified else ""
        return (f"{head}: {self.documents:,} documents, {self.sequences:,} sequences, "
                f"{self.tokens:,} tokens from {self.lines:,} lines ({self.bytes / 1e6:,.1f} MB) "
                f"in {self.seconds:.1f} s: {rates['docs_per_s']:,.0f} docs/s, "
                f"{rates['tokens_per_s']:,.0f} tokens/s, {rates['mb_per_s']:.2f} MB/s{verified}\n"
                f"{self.bad_lines.format()}")


def _progress_bar(inputs: Sequence[str], enabled: bool):
    from tqdm import tqdm

    compressed = any(path.endswith((".gz", ".zst")) for path in inputs)
    total = None if compressed or any(_is_fifo(p) for p in inputs) else sum(
        os.path.getsize(path) for path in inputs)
    return tqdm(total=total, unit="B", unit_scale=True, disable=not enabled, smoothing=0.1,
                mininterval=1.0, desc="preprocess")


class DocumentSample:
    """A uniform random sample (reservoir) of `size` documents of a run, each kept with its raw
    line and the sequences stored for it, for `verify_sample`."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.documents_seen = 0
        self.kept: List[Tuple[str, int, bytes, List[List[int]]]] = []
        self._random = random.Random(seed)

    def offer(self, source: LineBatch, batch: EncodedBatch) -> None:
        """Considers every document of `batch` (encoded from `source`)."""
        if self.size == 0:
            return
        token_ends = document_ends = None
        for document, (path, line_number) in enumerate(batch.line_numbers):
            seen = self.documents_seen
            self.documents_seen += 1
            slot = seen if seen < self.size else self._random.randrange(seen + 1)
            if slot >= self.size:
                continue
            if token_ends is None:
                token_ends = numpy.cumsum(batch.sequence_lengths, dtype=numpy.int64)
                document_ends = numpy.cumsum(batch.sequences_per_document, dtype=numpy.int64)
            last = int(document_ends[document])
            first = last - int(batch.sequences_per_document[document])
            sequences = [batch.tokens[token_ends[index] - batch.sequence_lengths[index]:
                                      token_ends[index]].tolist() for index in range(first, last)]
            entry = (path, line_number, source.lines[line_number - source.first_line_number],
                     sequences)
            if slot == len(self.kept):
                self.kept.append(entry)
            else:
                self.kept[slot] = entry

    def verify(self, encoder: LineEncoder) -> int:
        """Re-encodes the kept documents with plain SentencePiece; raises `VerificationError` at
        the first difference. Returns how many were checked."""
        for path, line_number, raw, stored in self.kept:
            expected = encoder.encode_line(raw, plain=True)
            if expected != stored:
                flat_expected = [token for sequence in expected for token in sequence]
                flat_stored = [token for sequence in stored for token in sequence]
                position = next((index for index, (a, b) in enumerate(
                    zip(flat_expected, flat_stored)) if a != b),
                    min(len(flat_expected), len(flat_stored)))
                raise VerificationError(
                    f"{path}:{line_number}: the stored ids differ from plain SentencePiece "
                    f"encoding at token {position}; no output written")
        return len(self.kept)


def run_encoding(inputs: Sequence[str], encoder: LineEncoder, writer: IndexedDatasetWriter,
                 result: PreprocessResult, executor=None, strict: bool = False,
                 batch_lines: int = 1024, batch_bytes: int = 1 << 20, progress: bool = False,
                 on_batch: Optional[Callable[[EncodedBatch, int], None]] = None,
                 sample: Optional[DocumentSample] = None, max_in_flight: int = 8) -> None:
    """Reads `inputs`, encodes them (in the pool `executor` of `pipeline.start_workers`, or here)
    and appends to `writer` in input order, filling `result`. `on_batch(batch,
    first_sequence_index)` sees every batch before it is written; `sample` is offered every
    batch. In strict mode raises `StrictModeError` at the first bad line. Does not commit."""
    start = time.perf_counter()
    lines = read_line_batches(inputs, batch_lines, batch_bytes, max_line_bytes=encoder.max_line_bytes)
    batches = encode_batches(lines, encoder,
                             executor, max_in_flight)
    bar = _progress_bar(inputs, progress)
    try:
        for source, batch in batches:
            if strict and batch.bad_lines:
                result.bad_lines.add(batch.bad_lines[0])
                result.lines += batch.bad_lines[0].line_number - source.first_line_number + 1
                raise StrictModeError(batch.bad_lines[0])
            for bad_line in batch.bad_lines:
                result.bad_lines.add(bad_line)
            if on_batch is not None:
                on_batch(batch, writer.num_sequences)
            if sample is not None:
                sample.offer(source, batch)
            writer.add_batch(batch.tokens, batch.sequence_lengths, batch.sequences_per_document)
            result.lines += batch.num_lines
            result.bytes += batch.num_bytes
            result.documents = writer.num_documents
            result.sequences = writer.num_sequences
            result.tokens = writer.num_tokens
            result.seconds = time.perf_counter() - start
            bar.update(batch.num_bytes)
            rates = result.rates()
            bar.set_postfix_str(f"{rates['docs_per_s']:,.0f} docs/s {rates['tokens_per_s']:,.0f} "
                                f"tok/s bad={result.bad_lines.total}", refresh=False)
    finally:
        batches.close()
        bar.close()
    result.seconds = time.perf_counter() - start


def make_encoder(config: PreprocessConfig) -> LineEncoder:
    """The worker-side encoder for `config.format`."""
    dtype = parse_dtype(config.dtype, vocab_size_of(config.tokenizer_model))
    options = dict(word_cache=config.word_cache, num_threads=config.threads_per_worker,
                   cache_bytes=config.cache_mb << 20)
    if config.format == "sft":
        return SFTExampleEncoder(config.tokenizer_model, dtype, config.max_line_bytes, **options)
    if config.format == "contrastive":
        return ContrastiveExampleEncoder(config.tokenizer_model, dtype, config.max_line_bytes,
                                         instructions=config.instructions, **options)
    return TextDocumentEncoder(config.tokenizer_model, dtype, config.max_line_bytes,
                               json_key=config.json_key, **options)


def vocab_size_of(model_path: str) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=model_path).get_piece_size()


def run_to_indexed(config: PreprocessConfig, extra_suffixes: Sequence[str] = (),
                   on_batch: Optional[Callable[[EncodedBatch, int], None]] = None,
                   before_commit: Optional[Callable[[IndexedDatasetWriter], Optional[Dict[
                       str, Any]]]] = None) -> PreprocessResult:
    """Encodes `config.inputs` into `<output_prefix>.bin/.idx` and its tokenizer record
    `<output_prefix>.meta.json` (`provenance`), plus the `extra_suffixes` files that
    `before_commit(writer)` writes at `writer.tmp_path(suffix)`, all committed atomically.
    `before_commit` may return fields that extend or replace those of the record (or rewrite the
    record file itself). A failure
    (`StrictModeError`, `EmptyOutputError`) carries the result so far as `error.result`."""
    encoder = make_encoder(config)
    executor = start_workers(encoder, config.workers)  # workers start up while we go on
    refusal = cache_refusal(config.tokenizer_model) if config.word_cache else None
    if refusal is not None:  # the workers found the same, quietly: said once for the run
        report_fallback(refusal)
    result = PreprocessResult(config.output_prefix,
                              bad_lines=BadLineReport(config.max_bad_line_examples))
    sample = DocumentSample(config.verify_sample, config.verify_seed)
    suffixes = tuple(extra_suffixes) + ((META_SUFFIX,) if META_SUFFIX not in extra_suffixes
                                        else ())
    try:
        with sigterm_raises_system_exit(), IndexedDatasetWriter(
                config.output_prefix, encoder.dtype, suffixes) as writer:
            run_encoding(config.inputs, encoder, writer, result, executor, config.strict,
                         config.batch_lines, config.batch_bytes, config.progress, on_batch,
                         sample, max_in_flight=4 * config.workers)
            if writer.num_documents == 0:
                raise EmptyOutputError(f"no documents in {', '.join(config.inputs)}: "
                                       f"{result.lines} lines read, none usable")
            result.verified = sample.verify(encoder)
            record = dataset_record(config.format, tokenizer_record(config.tokenizer_model),
                                    numpy.dtype(encoder.dtype).name, writer.num_documents,
                                    writer.num_sequences, writer.num_tokens, config.inputs)
            write_record(writer.tmp_path(META_SUFFIX), record)
            extra = before_commit(writer) if before_commit is not None else None
            if extra:
                record.update(extra)
                write_record(writer.tmp_path(META_SUFFIX), record)
            writer.commit()
            result.written = True
    except (StrictModeError, EmptyOutputError) as error:
        error.result = result
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    logger.info("%s", result.format())
    return result


def preprocess_jsonl(config: PreprocessConfig) -> PreprocessResult:
    """Tokenizes `config.inputs` (format `text` or `sft`) into `<output_prefix>.bin/.idx` and its
    tokenizer record, atomically. Raises `StrictModeError` in strict mode at the first bad line;
    on any error no output is left. Format `contrastive` is written by
    `megatron_conan.preprocess.contrastive_tokenize.tokenize_contrastive`."""
    if config.format == "contrastive":
        raise ConfigError("format contrastive is written by megatron_conan.preprocess.contrastive_"
                          "tokenize.tokenize_contrastive (tools/tokenize_contrastive.py)")
    return run_to_indexed(config)


def run_and_report(config: PreprocessConfig, report_json: Optional[str] = None,
                   run: Callable[[PreprocessConfig], PreprocessResult] = preprocess_jsonl) -> int:
    """What the command-line tools do: `run(config)`, print the report (documents, bad lines by
    kind with their first locations; also when the run failed), write it as JSON, and return 0;
    or raise a `DataError` (one line and exit status 2 under `errors.run_main`) when strict mode
    stopped at a bad line, no line was usable, or the share of bad lines exceeds
    `config.max_bad_fraction` (the output is then written all the same)."""
    try:
        result = run(config)
    except (StrictModeError, EmptyOutputError) as error:
        _report(error.result, report_json)
        raise
    _report(result, report_json)
    if result.bad_fraction > config.max_bad_fraction:
        raise TooManyBadLinesError(
            f"{result.bad_lines.total:,} of {result.lines:,} lines are bad "
            f"({result.bad_fraction:.2%}), more than --max-bad-fraction "
            f"{config.max_bad_fraction:.2%}; the output was written to {result.output_prefix}, "
            f"see the report above")
    return 0


def _report(result: PreprocessResult, report_json: Optional[str]) -> None:
    print(result.format())  # user-facing
    if report_json:
        write_report_json(result, report_json)


def write_report_json(result: PreprocessResult, path: str) -> None:
    with atomic_write.file(path) as tmp, open(tmp, "w", encoding="utf-8") as stream:
        json.dump(result.to_dict(), stream, indent=2)
