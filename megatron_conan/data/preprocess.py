"""JSONL (plain, .gz, .zst) -> megatron-core indexed dataset, with parallel workers.

`preprocess_jsonl(PreprocessConfig(...))` is what `tools/preprocess_data.py` calls. Formats:
- `text` (pretraining): one document per line, `record[json_key]` tokenized, EOD appended, one
  sequence per document (what `GPTDataset` reads).
- `sft`: `{"instruction", "input"?, "output"}` -> one document of two sequences, the prompt ids
  and the output ids + EOD (read by `megatron_conan.data.sft.SFTDataset`).
- `contrastive`: see `megatron_conan.data.contrastive` (also written by tools/tokenize_contrastive.py).
"""

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from megatron_conan.data.encoders import (
    ContrastiveExampleEncoder,
    SFTExampleEncoder,
    TextDocumentEncoder,
)
from megatron_conan.data.indexed import (
    IndexedDatasetWriter,
    parse_dtype,
    sigterm_raises_system_exit,
)
from megatron_conan.data.jsonl import BadLineReport, StrictModeError, read_line_batches
from megatron_conan.data.pipeline import EncodedBatch, LineEncoder, encode_batches
from megatron_conan.errors import ConfigError

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
    max_line_bytes: Optional[int] = 16 << 20
    """Lines longer than this (bytes, without the newline) are rejected as `too_long`."""
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

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one input file is needed")
        for path in self.inputs:
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


def _is_fifo(path: str) -> bool:
    import stat

    return os.path.exists(path) and stat.S_ISFIFO(os.stat(path).st_mode)


class EmptyOutputError(RuntimeError):
    """No input line gave a document; nothing is written (megatron-core cannot read an empty
    .bin)."""


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

    def rates(self) -> Dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {"docs_per_s": self.documents / seconds, "tokens_per_s": self.tokens / seconds,
                "mb_per_s": self.bytes / seconds / 1e6}

    def to_dict(self) -> Dict[str, Any]:
        return {"output_prefix": self.output_prefix, "lines": self.lines,
                "documents": self.documents, "sequences": self.sequences, "tokens": self.tokens,
                "bytes": self.bytes, "seconds": round(self.seconds, 3),
                **{key: round(value, 2) for key, value in self.rates().items()},
                "bad_lines": self.bad_lines.to_dict()}

    def format(self) -> str:
        rates = self.rates()
        return (f"wrote {self.output_prefix}.bin/.idx: {self.documents:,} documents, "
                f"{self.sequences:,} sequences, {self.tokens:,} tokens from {self.lines:,} lines "
                f"({self.bytes / 1e6:,.1f} MB) in {self.seconds:.1f} s: "
                f"{rates['docs_per_s']:,.0f} docs/s, {rates['tokens_per_s']:,.0f} tokens/s, "
                f"{rates['mb_per_s']:.2f} MB/s\n{self.bad_lines.format()}")


def _progress_bar(inputs: Sequence[str], enabled: bool):
    from tqdm import tqdm

    compressed = any(path.endswith((".gz", ".zst")) for path in inputs)
    total = None if compressed or any(_is_fifo(p) for p in inputs) else sum(
        os.path.getsize(path) for path in inputs)
    return tqdm(total=total, unit="B", unit_scale=True, disable=not enabled, smoothing=0.1,
                mininterval=1.0, desc="preprocess")


def run_encoding(inputs: Sequence[str], encoder: LineEncoder, writer: IndexedDatasetWriter,
                 result: PreprocessResult, workers: int = 1, strict: bool = False,
                 batch_lines: int = 1024, batch_bytes: int = 1 << 20, progress: bool = False,
                 on_batch: Optional[Callable[[EncodedBatch, int], None]] = None) -> None:
    """Reads `inputs`, encodes with `workers` processes and appends to `writer` in input order,
    filling `result`. `on_batch(batch, first_sequence_index)` sees every batch before it is
    written. In strict mode raises `StrictModeError` at the first bad line. Does not commit."""
    start = time.perf_counter()
    batches = encode_batches(read_line_batches(inputs, batch_lines, batch_bytes), encoder, workers)
    bar = _progress_bar(inputs, progress)
    try:
        for batch in batches:
            for bad_line in batch.bad_lines:
                result.bad_lines.add(bad_line)
            if strict and batch.bad_lines:
                raise StrictModeError(batch.bad_lines[0])
            if on_batch is not None:
                on_batch(batch, writer.num_sequences)
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
    if config.format == "sft":
        return SFTExampleEncoder(config.tokenizer_model, dtype, config.max_line_bytes)
    if config.format == "contrastive":
        return ContrastiveExampleEncoder(config.tokenizer_model, dtype, config.max_line_bytes,
                                         instructions=config.instructions)
    return TextDocumentEncoder(config.tokenizer_model, dtype, config.max_line_bytes,
                               json_key=config.json_key)


def vocab_size_of(model_path: str) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=model_path).get_piece_size()


def run_to_indexed(config: PreprocessConfig, extra_suffixes: Sequence[str] = (),
                   on_batch: Optional[Callable[[EncodedBatch, int], None]] = None,
                   before_commit: Optional[Callable[[IndexedDatasetWriter], None]] = None,
                   ) -> PreprocessResult:
    """Encodes `config.inputs` into `<output_prefix>.bin/.idx` (plus `extra_suffixes` files that
    `before_commit(writer)` writes at `writer.tmp_path(suffix)`), all committed atomically."""
    encoder = make_encoder(config)
    result = PreprocessResult(config.output_prefix,
                              bad_lines=BadLineReport(config.max_bad_line_examples))
    with sigterm_raises_system_exit(), IndexedDatasetWriter(
            config.output_prefix, encoder.dtype, extra_suffixes) as writer:
        run_encoding(config.inputs, encoder, writer, result, config.workers, config.strict,
                     config.batch_lines, config.batch_bytes, config.progress, on_batch)
        if writer.num_documents == 0:
            raise EmptyOutputError(f"no documents in {config.inputs}: {result.lines} lines read, "
                                   f"none usable\n{result.bad_lines.format()}")
        if before_commit is not None:
            before_commit(writer)
        writer.commit()
    logger.info("%s", result.format())
    return result


def preprocess_jsonl(config: PreprocessConfig) -> PreprocessResult:
    """Tokenizes `config.inputs` into `<output_prefix>.bin/.idx` atomically (format `contrastive`
    adds its example index). Raises `StrictModeError` in strict mode at the first bad line; on any
    error no output is left."""
    if config.format == "contrastive":
        from megatron_conan.data.contrastive import tokenize_contrastive

        return tokenize_contrastive(config)
    return run_to_indexed(config)


def run_and_report(config: PreprocessConfig, report_json: Optional[str] = None) -> int:
    """What the command-line tools do: run, print the final report (and write it as JSON), and
    return the exit status: 0; 2 when strict mode stopped at a bad line; 1 when no line was
    usable."""
    import sys

    try:
        result = preprocess_jsonl(config)
    except StrictModeError as error:
        print(f"error: {error}; no output written", file=sys.stderr)
        return 2
    except EmptyOutputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.format())
    if report_json:
        write_report_json(result, report_json)
    return 0


def write_report_json(result: PreprocessResult, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as stream:
        json.dump(result.to_dict(), stream, indent=2)
    os.replace(tmp, path)
