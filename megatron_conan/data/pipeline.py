"""Parallel line-batch encoding: raw JSONL lines -> token sequences, in input order.

The main process reads and decompresses input in `LineBatch`es and writes results; worker processes
parse, validate and tokenize. Results come back in input order, with at most a few batches per
worker in flight, so memory stays bounded whatever the input size. Workers are spawned (no fork of
a process holding torch threads) and import only this module, `jsonl` and sentencepiece.
"""

import concurrent.futures
import dataclasses
import itertools
import multiprocessing
from collections import deque
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Type

import numpy

from megatron_conan.data.jsonl import BadLine, BadLineError, LineBatch, parse_json_object


@dataclasses.dataclass
class EncodedBatch:
    """What one `LineBatch` turned into. A document is one good input line; it owns one or more
    consecutive sequences."""

    tokens: numpy.ndarray
    """All token ids of the batch, back to back, in the output dtype."""
    sequence_lengths: numpy.ndarray
    """int32 [num_sequences]."""
    sequences_per_document: numpy.ndarray
    """int32 [num_documents]."""
    records: List[Any]
    """Encoder-specific metadata, one per document."""
    line_numbers: List[Tuple[str, int]]
    """(path, line number) of each document."""
    bad_lines: List[BadLine]
    num_lines: int
    num_bytes: int


class LineEncoder:
    """Turns raw JSONL lines into token sequences. Subclasses define `extract` (validate a record,
    return its texts and metadata) and may override `assemble` (turn the texts' ids into the stored
    sequences). Instances are pickled to workers, so they hold only plain settings until `load()`.
    """

    def __init__(self, tokenizer_model: str, dtype: Type[numpy.number],
                 max_line_bytes: Optional[int] = None):
        self.tokenizer_model = tokenizer_model
        self.dtype = numpy.dtype(dtype).type
        self.max_line_bytes = max_line_bytes
        self._processor = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_processor"] = None
        return state

    def load(self) -> None:
        if self._processor is None:
            import sentencepiece

            self._processor = sentencepiece.SentencePieceProcessor(model_file=self.tokenizer_model)

    @property
    def eod_id(self) -> int:
        return self._processor.eos_id()

    def extract(self, record: dict) -> Tuple[List[str], Any]:
        """Validated texts of one record, and its metadata; raises `BadLineError`."""
        raise NotImplementedError

    def assemble(self, token_ids: List[List[int]], metadata: Any) -> Tuple[List[List[int]], Any]:
        """The sequences to store for one record, and the metadata to keep."""
        return token_ids, metadata

    def encode_texts(self, texts: List[str]) -> List[List[int]]:
        # One call per batch keeps the Python overhead per document low; one thread, so that
        # `--workers` alone decides how many cores are used.
        return self._processor.encode(texts, out_type=int, num_threads=1) if texts else []

    def __call__(self, batch: LineBatch) -> EncodedBatch:
        self.load()
        bad_lines: List[BadLine] = []
        texts: List[str] = []
        pending: List[Tuple[int, int, Any]] = []  # (line offset, number of texts, metadata)
        for offset, raw in enumerate(batch.lines):
            try:
                record_texts, metadata = self.extract(parse_json_object(raw, self.max_line_bytes))
            except BadLineError as error:
                bad_lines.append(BadLine(batch.path, batch.first_line_number + offset,
                                         error.kind, error.detail))
                continue
            pending.append((offset, len(record_texts), metadata))
            texts.extend(record_texts)
        all_ids = self.encode_texts(texts)
        sequences: List[List[int]] = []
        per_document: List[int] = []
        records: List[Any] = []
        line_numbers: List[Tuple[str, int]] = []
        cursor = 0
        for offset, count, metadata in pending:
            stored, kept = self.assemble(all_ids[cursor:cursor + count], metadata)
            cursor += count
            sequences.extend(stored)
            per_document.append(len(stored))
            records.append(kept)
            line_numbers.append((batch.path, batch.first_line_number + offset))
        lengths = numpy.fromiter((len(sequence) for sequence in sequences), dtype=numpy.int32,
                                 count=len(sequences))
        tokens = numpy.fromiter(itertools.chain.from_iterable(sequences), dtype=self.dtype,
                                count=int(lengths.sum()))
        return EncodedBatch(tokens, lengths, numpy.array(per_document, dtype=numpy.int32), records,
                            line_numbers, bad_lines, len(batch.lines), batch.num_bytes)


_worker_encoder: Optional[LineEncoder] = None


def _init_worker(encoder: LineEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    _worker_encoder.load()


def _encode_in_worker(batch: LineBatch) -> EncodedBatch:
    return _worker_encoder(batch)


def encode_batches(batches: Iterable[LineBatch], encoder: LineEncoder, workers: int = 1,
                   batches_in_flight_per_worker: int = 4) -> Iterator[EncodedBatch]:
    """Encodes `batches` with `workers` processes (1: in this process), yielding in input order.
    A worker that dies (OOM kill, crash) raises `BrokenProcessPool` here instead of hanging.
    Closing the iterator early cancels the pending work."""
    if workers <= 1:
        encoder.load()
        for batch in batches:
            yield encoder(batch)
        return
    executor = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(encoder,))
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append(executor.submit(_encode_in_worker, batch))
            if len(pending) >= workers * batches_in_flight_per_worker:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
