"""SFT triples -> stage-3 pairs, as in the paper: instruction + input is the query, the output its
positive, optionally filtered by a teacher embedding model (pairs it scores below 0.4 dropped).

    report = sft_to_pairs(SFTPairsConfig(inputs=["sft.jsonl"], output="pairs.jsonl",
                                         teacher="models/teacher", min_score=0.4))

Input: SFT JSONL (`instruction`, `input`?, `output`; megatron_conan/data/README.md). Output: `pair` JSONL
(`{"task": "pair", "query", "positive"}`) for tools/tokenize_contrastive.py, in input order,
written to a temporary file and renamed when complete. Bad lines are counted per kind with their
`file:line`; pairs the teacher drops are counted and the first few listed with their scores:
nothing disappears silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Dict, List, Optional, Tuple

from megatron_conan import atomic_write
from megatron_conan.data.jsonl import (BadLine, BadLineError, BadLineReport, parse_json_object,
                                       read_line_batches, require_text)
from megatron_conan.errors import ConfigError, DataError, InputError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTPairsConfig:
    """One conversion run."""

    inputs: List[str]
    """SFT JSONL files (plain, .gz or .zst), read in order."""
    output: str
    """Pair JSONL to write."""
    teacher: Optional[str] = None
    """A local sentence-transformers model directory (loaded offline) that scores each pair; None
    keeps every pair."""
    min_score: float = 0.4
    """Pairs whose teacher cosine is below this are dropped (the paper's threshold)."""
    teacher_batch_size: int = 64
    """Texts per teacher forward pass."""
    device: Optional[str] = None
    """Torch device of the teacher (None: sentence-transformers' choice)."""
    max_line_bytes: int = 16 << 20
    """Longer lines are bad lines (`too_long`)."""
    max_examples: int = 10
    """Locations kept per kind of bad line, and dropped pairs listed."""
    progress: bool = True
    """A progress bar on stderr."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one SFT JSONL file is needed")
        for path in self.inputs:
            if not os.path.isfile(path):
                raise DataError(f"inputs: no such file {path!r}")
        if not math.isfinite(self.min_score):
            raise ConfigError(f"min_score must be finite, got {self.min_score}")
        if self.teacher_batch_size < 1:
            raise ConfigError(f"teacher_batch_size must be >= 1, got {self.teacher_batch_size}")


@dataclasses.dataclass
class SFTPairsReport:
    """What a run did: every line read is a written pair, a bad line or a teacher drop."""

    output: str
    lines: int = 0
    pairs: int = 0
    """Pairs written."""
    dropped: int = 0
    """Pairs the teacher scored below `min_score`."""
    dropped_examples: List[str] = dataclasses.field(default_factory=list)
    """The first dropped pairs as `file:line (score)`."""
    bad_lines: BadLineReport = dataclasses.field(default_factory=BadLineReport)

    def to_dict(self) -> Dict[str, object]:
        return {"output": self.output, "lines": self.lines, "pairs": self.pairs,
                "dropped_by_teacher": self.dropped, "dropped_examples": self.dropped_examples,
                "bad_lines": self.bad_lines.to_dict()}

    def format(self) -> str:
        lines = [f"wrote {self.pairs:,} pairs to {self.output} from {self.lines:,} lines; "
                 f"teacher dropped {self.dropped:,}"]
        if self.dropped_examples:
            lines.append("  dropped: " + ", ".join(self.dropped_examples))
        lines.append(self.bad_lines.format())
        return "\n".join(lines)


def sft_record_to_pair(record: dict) -> Tuple[str, str]:
    """(query, positive): `instruction`, joined with `input` by a newline when the input is
    present and not empty, and `output`. Raises `BadLineError`."""
    instruction = require_text(record, "instruction")
    input_text = record.get("input")
    if input_text is not None:
        input_text = require_text(record, "input", allow_empty=True)
    output = require_text(record, "output")
    query = f"{instruction}\n{input_text}" if input_text and input_text.strip() else instruction
    return query, output


def load_teacher(path: str, device: Optional[str] = None):
    """The sentence-transformers model at the local directory `path`, loaded offline; a missing
    directory or one that is not such a model is an `InputError` naming it."""
    if not os.path.isdir(path):
        raise InputError(f"teacher model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "modules.json")):
        raise InputError(f"teacher {path!r} is not a sentence-transformers model directory (no "
                         f"modules.json)")
    from sentence_transformers import SentenceTransformer

    try:
        # weights from safetensors only: a pickled .bin from someone else could run code
        return SentenceTransformer(path, device=device, local_files_only=True,
                                   model_kwargs={"use_safetensors": True})
    except (OSError, ValueError, KeyError) as error:
        message = " ".join(str(error).split())
        raise InputError(f"teacher {path!r} cannot be loaded as a sentence-transformers model: "
                         f"{message}") from None


def teacher_scores(model, queries: List[str], positives: List[str], batch_size: int):
    """[n] cos(query, positive) under the teacher."""
    import numpy

    if not queries:
        return numpy.zeros(0, dtype=numpy.float32)
    embeddings = model.encode(queries + positives, batch_size=batch_size, convert_to_numpy=True,
                              normalize_embeddings=True, show_progress_bar=False)  # [2n, d]
    return (embeddings[:len(queries)] * embeddings[len(queries):]).sum(axis=1)


def sft_to_pairs(config: SFTPairsConfig) -> SFTPairsReport:
    """Converts `config.inputs` into `config.output` atomically (see the module doc). A run with
    no pair to write raises `DataError` and leaves no output."""
    from tqdm import tqdm

    teacher = load_teacher(config.teacher, config.device) if config.teacher else None
    report = SFTPairsReport(config.output, bad_lines=BadLineReport(config.max_examples))
    directory = os.path.dirname(os.path.abspath(config.output))
    os.makedirs(directory, exist_ok=True)
    bar = tqdm(disable=not config.progress, unit=" lines", desc="sft->pairs", mininterval=1.0)
    try:
        with atomic_write.file(config.output) as temporary, open(temporary, "w", encoding="utf-8") as out:
            for batch in read_line_batches(config.inputs, max_lines=max(config.teacher_batch_size, 256)):
                pairs, where = [], []
                for offset, raw in enumerate(batch.lines):
                    line_number = batch.first_line_number + offset
                    try:
                        pairs.append(sft_record_to_pair(parse_json_object(raw, config.max_line_bytes)))
                        where.append(f"{batch.path}:{line_number}")
                    except BadLineError as error:
                        report.bad_lines.add(BadLine(batch.path, line_number, error.kind, error.detail))
                keep = [True] * len(pairs)
                if teacher is not None:
                    scores = teacher_scores(teacher, [q for q, _ in pairs], [p for _, p in pairs],
                                            config.teacher_batch_size)
                    for index, score in enumerate(scores):
                        if score < config.min_score:
                            keep[index] = False
                            report.dropped += 1
                            if len(report.dropped_examples) < config.max_examples:
                                report.dropped_examples.append(f"{where[index]} ({score:.3f})")
                for (query, positive), kept in zip(pairs, keep):
                    if kept:
                        out.write(json.dumps({"task": "pair", "query": query, "positive": positive},
                                             ensure_ascii=False) + "\n")
                        report.pairs += 1
                report.lines += len(batch.lines)
                bar.update(len(batch.lines))
            if report.pairs == 0:
                raise DataError(f"no pairs to write from {config.inputs}: {report.lines} lines, "
                                f"{report.bad_lines.total} bad, {report.dropped} dropped by the teacher")
    finally:
        bar.close()
    logger.info("%s", report.format())
    return report
