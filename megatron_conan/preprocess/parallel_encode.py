"""Parallel line-batch encoding: raw JSONL lines -> token sequences, in input order.

The main process reads and decompresses input in `LineBatch`es and writes results; worker processes
parse, validate and tokenize. Results come back in input order, with at most a few batches per
worker in flight, so memory stays bounded whatever the input size. Workers are spawned (no fork of
a process holding torch threads) and import only this module, `data.jsonl`, `data.word_cache`, numpy and
sentencepiece (never torch or megatron-core: a worker is ready in a fraction of a second).
"""

import abc
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
from collections import deque
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Type

import numpy

from megatron_conan.data.jsonl import BadLine, BadLineError, LineBatch, parse_json_object
from megatron_conan.data.word_cache import CachedEncoder


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


class LineEncoder(abc.ABC):
    """Turns raw JSONL lines into token sequences. Subclasses define `extract` (validate a record,
    return its texts and metadata) and may override `assemble` (turn the texts' ids into the stored
    sequences). Instances are pickled to workers, so they hold only plain settings until `load()`.
    """

    def __init__(self, tokenizer_model: str, dtype: Type[numpy.number],
                 max_line_bytes: Optional[int] = None, word_cache: bool = True,
                 num_threads: int = 1, cache_bytes: int = 256 << 20):
        self.tokenizer_model = tokenizer_model
        self.dtype = numpy.dtype(dtype).type
        self.max_line_bytes = max_line_bytes
        self.word_cache = word_cache
        self.num_threads = num_threads
        self.cache_bytes = cache_bytes
        self._encoder: Optional[CachedEncoder] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_encoder"] = None
        return state

    def load(self) -> None:
        if self._encoder is None:
            self._encoder = CachedEncoder.from_file(
                self.tokenizer_model, use_cache=self.word_cache, max_bytes=self.cache_bytes,
                num_threads=self.num_threads, quiet=True)  # the run says it once (preprocess)

    @property
    def encoder(self) -> CachedEncoder:
        self.load()
        return self._encoder

    @property
    def eod_id(self) -> int:
        return self._encoder.processor.eos_id()

    @abc.abstractmethod
    def extract(self, record: dict) -> Tuple[List[str], Any]:
        """Validated texts of one record, and its metadata; raises `BadLineError`."""

    def assemble(self, token_ids: List[List[int]], metadata: Any) -> Tuple[List[List[int]], Any]:
        """The sequences to store for one record, and the metadata to keep."""
        return token_ids, metadata

    def encode_texts(self, texts: List[str], plain: bool = False) -> List[List[int]]:
        """One call per batch keeps the Python overhead per document low. `plain`: SentencePiece's
        own encoding, without the word cache (the reference `--verify-sample` compares with)."""
        if not texts:
            return []
        return self._encoder.encode_plain(texts) if plain else self._encoder.encode(texts)

    def encode_line(self, raw: bytes, plain: bool = False) -> List[List[int]]:
        """The stored sequences of one good line (raises `BadLineError` for a bad one)."""
        self.load()
        texts, metadata = self.extract(parse_json_object(raw, self.max_line_bytes))
        return self.assemble(self.encode_texts(texts, plain), metadata)[0]

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


def start_workers(encoder: LineEncoder, workers: int
                  ) -> Optional[concurrent.futures.ProcessPoolExecutor]:
    """The worker pool for `encode_batches` (None for 1: encode in this process), with every
    worker already starting up, so that their start overlaps whatever the caller does next."""
    if workers <= 1:
        return None
    executor = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(encoder,))
    for _ in range(workers):
        executor.submit(int)  # a no-op task makes the executor spawn its processes now
    return executor


def encode_batches(batches: Iterable[LineBatch], encoder: LineEncoder,
                   executor: Optional[concurrent.futures.ProcessPoolExecutor] = None,
                   max_in_flight: int = 8) -> Iterator[Tuple[LineBatch, EncodedBatch]]:
    """Encodes `batches` with the pool of `start_workers` (None: in this process), yielding
    (input batch, its encoding) in input order, with at most `max_in_flight` batches submitted
    and not yet yielded (4 per worker keeps every worker busy). A worker that dies (OOM kill,
    crash) raises `BrokenProcessPool` here instead of hanging. Closing the iterator early cancels
    the pending work and shuts the pool down."""
    if executor is None:
        encoder.load()
        for batch in batches:
            yield batch, encoder(batch)
        return
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, executor.submit(_encode_in_worker, batch)))
            if len(pending) >= max_in_flight:
                source, future = pending.popleft()
                yield source, future.result()
        while pending:
            source, future = pending.popleft()
            yield source, future.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
