"""Writing megatron-core indexed datasets (.bin/.idx) atomically, reading their index, merging.

The format is megatron-core's (`megatron.core.datasets.indexed_dataset`, read with its
`IndexedDataset`): `.bin` holds the token ids of every sequence back to back in one dtype; `.idx`
holds a header (magic, version 1, dtype code), the sequence and document counts, then int32
sequence lengths, int64 byte offsets and int64 document boundaries (sequence indices, starting at
0). This module writes and reads it with numpy alone, without importing megatron-core or torch
(seconds of start-up for every preprocessing run and worker), and with whole arrays instead of
megatron's `IndexedDatasetBuilder`, whose per-item Python loops dominate preprocessing time at
scale. tests/data/test_indexed.py proves the bytes equal what megatron-core's builder writes.

Atomicity: the outputs are one `megatron_conan.atomic_write.FileSet`, written in a hidden staging
directory beside them (`.<name>.idx.tmp-XXXXXXXX/`) and renamed into place only when all of it is
complete; the `.idx` is renamed last and is the marker of a complete dataset. An exception
(strict-mode stop, SIGTERM, Ctrl-C) removes the staging directory; a SIGKILL can leave it behind but
never a final `.bin`/`.idx` pair that looks complete.
"""

import contextlib
import dataclasses
import os
import signal
import struct
from typing import Dict, Iterator, List, Optional, Sequence, Type

import numpy

from megatron_conan import atomic_write
from megatron_conan.data.provenance import META_SUFFIX, merged_record, write_record
from megatron_conan.errors import ConfigError, DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
"""The first 9 bytes of every .idx (megatron-core's `_INDEX_HEADER`)."""
_INDEX_VERSION = 1
DTYPE_CODES: Dict[type, int] = {numpy.uint8: 1, numpy.int8: 2, numpy.int16: 3, numpy.int32: 4,
                                numpy.int64: 5, numpy.float64: 6, numpy.float32: 7,
                                numpy.uint16: 8}
"""Token dtype -> the code stored in the .idx header (megatron-core's `DType`)."""
_UINT16_VOCAB_LIMIT = 65500
"""megatron-core's `DType.optimal_dtype`: uint16 below this cardinality, else int32."""
_COPY_CHUNK_BYTES = 64 << 20


def get_bin_path(prefix: str) -> str:
    return prefix + ".bin"


def get_idx_path(prefix: str) -> str:
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    """A complete dataset: both files (the .idx is renamed into place last)."""
    return os.path.exists(get_idx_path(prefix)) and os.path.exists(get_bin_path(prefix))


def token_dtype_for_vocab(vocab_size: int) -> Type[numpy.number]:
    """uint16 when every id fits (megatron-core's rule: vocab < 65500), else int32."""
    return numpy.uint16 if vocab_size < _UINT16_VOCAB_LIMIT else numpy.int32


def parse_dtype(name: str, vocab_size: int) -> Type[numpy.number]:
    """`auto` picks from the vocab size; `uint16`/`int32` force a dtype (checked against it)."""
    if name == "auto":
        return token_dtype_for_vocab(vocab_size)
    dtype = {"uint16": numpy.uint16, "int32": numpy.int32}.get(name)
    if dtype is None:
        raise ConfigError(f"dtype must be auto, uint16 or int32, got {name!r}")
    if vocab_size - 1 > numpy.iinfo(dtype).max:
        raise ConfigError(f"dtype {name} cannot hold ids of a vocab of {vocab_size}")
    return dtype


@dataclasses.dataclass
class IndexArrays:
    """What a .idx holds."""

    dtype: Type[numpy.number]
    sequence_lengths: numpy.ndarray
    """int32 [num_sequences]."""
    sequence_pointers: numpy.ndarray
    """int64 [num_sequences], byte offsets into the .bin."""
    document_indices: numpy.ndarray
    """int64 [num_documents + 1], sequence index where each document starts, then the count."""


_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8
"""Magic, version, dtype code, sequence count, document count."""


def _check_index_size(path: str, size: int, num_sequences: int, num_documents: int) -> None:
    """The arrays the header announces must fill the rest of the file exactly, checked before
    anything is allocated: a corrupt or hostile header must not ask for terabytes."""
    expected = _HEADER_BYTES + num_sequences * (4 + 8) + num_documents * 8
    if expected != size:
        raise DataError(f"{path}: truncated or corrupt index: its header announces {num_sequences:,} "
                        f"sequences and {num_documents:,} document boundaries ({expected:,} bytes), the "
                        f"file has {size:,} bytes")


def read_index(prefix: str) -> IndexArrays:
    """Reads `<prefix>.idx` (megatron-core layout, without the multimodal modes); raises
    DataError naming the file when it is not one. A write of the dataset that a crash stopped
    mid-commit is finished first (``atomic_write.finish_interrupted_commits``)."""
    path = get_idx_path(prefix)
    atomic_write.finish_interrupted_commits(os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path):
        raise DataError(f"{path}: a directory, not an index file")
    with open(path, "rb") as stream:
        header = stream.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES or not header.startswith(INDEX_HEADER):
            raise DataError(f"{path}: not a megatron-core index file (bad header)")
        version, code, num_sequences, num_documents = struct.unpack(
            "<QBQQ", header[len(INDEX_HEADER):])
        dtypes = {value: key for key, value in DTYPE_CODES.items()}
        if version != _INDEX_VERSION or code not in dtypes:
            raise DataError(f"{path}: unsupported index version {version} or dtype code {code}")
        _check_index_size(path, os.fstat(stream.fileno()).st_size, num_sequences, num_documents)
        lengths = numpy.fromfile(stream, dtype=numpy.int32, count=num_sequences)
        pointers = numpy.fromfile(stream, dtype=numpy.int64, count=num_sequences)
        documents = numpy.fromfile(stream, dtype=numpy.int64, count=num_documents)
    if len(lengths) != num_sequences or len(pointers) != num_sequences or len(
            documents) != num_documents:
        raise DataError(f"{path}: truncated index")
    return IndexArrays(dtypes[code], lengths, pointers, documents)


def write_index(stream, dtype: Type[numpy.number], sequence_lengths: numpy.ndarray,
                document_indices: numpy.ndarray) -> None:
    """Writes megatron-core's .idx layout (see the module docstring) to an open binary stream."""
    sequence_lengths = numpy.ascontiguousarray(sequence_lengths, dtype=numpy.int32)
    pointers = numpy.zeros(len(sequence_lengths), dtype=numpy.int64)
    if len(sequence_lengths) > 1:
        numpy.cumsum(sequence_lengths[:-1], dtype=numpy.int64, out=pointers[1:])
    pointers *= numpy.dtype(dtype).itemsize
    stream.write(INDEX_HEADER)
    stream.write(struct.pack("<Q", _INDEX_VERSION))
    stream.write(struct.pack("<B", DTYPE_CODES[numpy.dtype(dtype).type]))
    stream.write(struct.pack("<Q", len(sequence_lengths)))
    stream.write(struct.pack("<Q", len(document_indices)))
    stream.write(sequence_lengths.tobytes(order="C"))
    stream.write(pointers.tobytes(order="C"))
    stream.write(numpy.ascontiguousarray(document_indices, dtype=numpy.int64).tobytes(order="C"))


class IndexedDatasetWriter:
    """Appends batches of sequences to `<prefix>.bin` and writes `<prefix>.idx` on `commit()`.

    `extra_suffixes` name further files (`<prefix><suffix>`) that belong to the same atomic output;
    write them at `writer.tmp_path(suffix)` before `commit()`. Use as a context manager: leaving the
    block with an exception aborts, leaving it normally without `commit()` aborts too.
    """

    def __init__(self, prefix: str, dtype: Type[numpy.number], extra_suffixes: Sequence[str] = ()):
        self.prefix = prefix
        self.dtype = numpy.dtype(dtype).type
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self._files = atomic_write.FileSet([get_bin_path(prefix)]
                                  + [prefix + suffix for suffix in extra_suffixes]
                                  + [get_idx_path(prefix)])
        self._bin = open(self._files.tmp(get_bin_path(prefix)), "wb")
        self._length_chunks: List[numpy.ndarray] = []
        self._document_end_chunks: List[numpy.ndarray] = [numpy.zeros(1, dtype=numpy.int64)]
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    def tmp_path(self, suffix: str) -> str:
        return self._files.tmp(self.prefix + suffix)

    def add_batch(self, tokens: numpy.ndarray, sequence_lengths: numpy.ndarray,
                  sequences_per_document: numpy.ndarray) -> None:
        """tokens: all sequences back to back; sequence_lengths: [num_sequences];
        sequences_per_document: [num_documents], summing to num_sequences."""
        tokens = numpy.ascontiguousarray(tokens, dtype=self.dtype)
        sequence_lengths = numpy.asarray(sequence_lengths, dtype=numpy.int32)
        sequences_per_document = numpy.asarray(sequences_per_document, dtype=numpy.int64)
        if int(sequence_lengths.sum()) != len(tokens):
            raise ValueError("sequence lengths do not add up to the number of tokens")
        if int(sequences_per_document.sum()) != len(sequence_lengths):
            raise ValueError("sequences per document do not add up to the number of sequences")
        self._bin.write(tokens.tobytes(order="C"))
        self._length_chunks.append(sequence_lengths)
        self._document_end_chunks.append(self.num_sequences + numpy.cumsum(sequences_per_document))
        self.num_sequences += len(sequence_lengths)
        self.num_documents += len(sequences_per_document)
        self.num_tokens += len(tokens)

    def add_document(self, sequences: Sequence[Sequence[int]]) -> None:
        """Convenience for small writers: one document made of `sequences`."""
        lengths = numpy.array([len(sequence) for sequence in sequences], dtype=numpy.int32)
        flat = numpy.fromiter((token for sequence in sequences for token in sequence),
                              dtype=self.dtype, count=int(lengths.sum()))
        self.add_batch(flat, lengths, numpy.array([len(sequences)]))

    def append_indexed(self, prefix: str) -> None:
        """Appends a whole existing indexed dataset (used to merge shards)."""
        source = read_index(prefix)
        if numpy.dtype(source.dtype) != numpy.dtype(self.dtype):
            raise DataError(f"{prefix}: dtype {numpy.dtype(source.dtype).name} differs "
                             f"from the output's {numpy.dtype(self.dtype).name}")
        lengths = source.sequence_lengths
        per_document = numpy.diff(source.document_indices)
        with open(get_bin_path(prefix), "rb") as stream:
            copied = 0
            while chunk := stream.read(_COPY_CHUNK_BYTES):
                self._bin.write(chunk)
                copied += len(chunk)
        itemsize = numpy.dtype(self.dtype).itemsize
        if copied != int(lengths.sum()) * itemsize:
            raise DataError(f"{prefix}: .bin has {copied} bytes, .idx describes "
                             f"{int(lengths.sum()) * itemsize}")
        self._length_chunks.append(lengths)
        self._document_end_chunks.append(self.num_sequences + numpy.cumsum(per_document))
        self.num_sequences += len(lengths)
        self.num_documents += len(per_document)
        self.num_tokens += int(lengths.sum())

    def commit(self) -> None:
        """Writes the .idx and renames every output into place (the .idx last)."""
        self._bin.close()
        lengths = (numpy.concatenate(self._length_chunks) if self._length_chunks
                   else numpy.zeros(0, dtype=numpy.int32))
        with open(self._files.tmp(get_idx_path(self.prefix)), "wb") as stream:
            write_index(stream, self.dtype, lengths, numpy.concatenate(self._document_end_chunks))
        self._files.commit()
        self._done = True

    def abort(self) -> None:
        self._bin.close()
        self._files.abort()
        self._done = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self._done:
            self.abort()


def merge_indexed_datasets(prefixes: Sequence[str], output_prefix: str) -> IndexedDatasetWriter:
    """Concatenates indexed datasets written in parallel into one, atomically. All inputs must
    share one dtype, and their tokenizer records (`provenance`) one tokenizer; the merged dataset
    gets the combined record. Returns the (committed) writer, whose counters describe the
    result."""
    if not prefixes:
        raise ConfigError("nothing to merge")
    for prefix in prefixes:
        if not dataset_exists(prefix):
            raise DataError(f"no complete indexed dataset at {prefix} (.bin + .idx)")
    record = merged_record(prefixes)
    dtype = read_index(prefixes[0]).dtype
    with IndexedDatasetWriter(output_prefix, dtype,
                              (META_SUFFIX,) if record is not None else ()) as writer:
        for prefix in prefixes:
            writer.append_indexed(prefix)
        if record is not None:
            write_record(writer.tmp_path(META_SUFFIX), record)
        writer.commit()
    return writer


@contextlib.contextmanager
def sigterm_raises_system_exit() -> Iterator[None]:
    """Turns SIGTERM (what SLURM and `kill` send) into SystemExit, so that `finally` blocks and
    context managers remove partial outputs. Only in the main thread; restored afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    previous: Optional[object] = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
