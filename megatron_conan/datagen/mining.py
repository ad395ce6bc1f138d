"""Offline hard-negative mining: a ranked pool of hard negatives per (query, positive) example, in the
JSONL form the contrastive store reads (``negatives`` + ``candidates``, docs/DESIGN.md section 6).

For each example, the corpus texts are ranked against the query: by exact search (every text
scored, corpus streamed in blocks from a memory-mapped file, so memory stays bounded whatever the
corpus size), or from a million texts on, when faiss is installed (the `ann` extra), by an
approximate inverted-file index, which scores a few cells of the corpus per query instead of all of
it (`MiningConfig.search`; docs/SCALE.md has both costs at the paper's 10M passages). Walking the
ranking best first:

1. the example's positives are never negatives (every positive of an identical query text, matched
   by text);
2. the ``skip_top`` best remaining texts are skipped: near the top, "negatives" are often unlabelled
   positives (false negatives);
3. a candidate must satisfy the optional filters: ``score <= max_score``,
   ``score <= s_pos - absolute_margin``, ``score <= s_pos - relative_margin * |s_pos|`` (s_pos: the
   query's score with its own positive; the same definitions as sentence-transformers'
   ``mine_hard_negatives``);
4. the first ``pool_size`` survivors form the pool, best first: the first ``num_negatives`` are
   written as ``negatives``, the rest as ``candidates`` (DHNM's replacements, in order).

Queries carry their record's ``instruction`` (``Instruct: ...\\nQuery: ``) or else the embedder's
query prompt; corpus texts carry none. Examples whose pool has fewer than ``num_negatives`` texts are
written as they are and listed in the report (with their input line), never dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy

from megatron_conan.errors import DataError, InputError
from megatron_conan.eval.search import ANN_ENCODINGS, ann_top_k, exact_top_k
from megatron_conan.eval.text_io import iter_jsonl_records, read_texts, record_text, save_json, write_atomically
from megatron_conan.tasks import BY_NAME, TASKS, format_instruction

logger = logging.getLogger(__name__)

MINABLE_TASKS = {task.name: task.mined_as for task in TASKS if task.mined_as}
"""Input task -> output task (the task table's `mined_as`): mined pairs become retrieval examples."""
REPORT_EXAMPLES = 20
"""Examples listed by line in the report, per kind."""


@dataclasses.dataclass
class MiningConfig:
    """How hard negatives are chosen (see the module docstring for the order of the rules)."""

    num_negatives: int = 7
    """Written as ``negatives`` (the paper's 7 per query)."""
    pool_size: int = 32
    """Negatives + candidates kept per example, best first."""
    skip_top: int = 5
    """Best-scoring non-positive texts skipped per query (likely false negatives)."""
    max_score: Optional[float] = None
    """Keep only candidates scoring at most this (None: no limit)."""
    absolute_margin: Optional[float] = None
    """Keep only candidates scoring at most s_pos - margin (None: no limit)."""
    relative_margin: Optional[float] = None
    """Keep only candidates scoring at most s_pos - margin * |s_pos| (None: no limit)."""
    search_depth: Optional[int] = None
    """Texts retrieved per query before the rules apply; default skip_top + pool_size + 32 (more if
    margins discard many)."""
    query_prompt: str = "query"
    """Prompt of queries without an instruction of their own (`query` or `none`)."""
    batch_size: int = 32
    """Texts per forward pass."""
    encode_chunk: int = 8192
    """Texts embedded per call before being written to the memory-mapped store."""
    query_block: int = 1024
    """Queries scored together."""
    corpus_block: int = 16384
    """Corpus rows scored per matrix product."""
    search: str = "auto"
    """`exact` (every query against every text), `ann` (a faiss inverted-file index: the optional
    `ann` extra) or `auto`: approximate from `ann_min_corpus` texts on when faiss is installed,
    exact below (or without faiss, with a warning past the threshold). Exact search costs queries x
    corpus; at the paper's 10M passages that is years of one node (docs/SCALE.md)."""
    ann_min_corpus: int = 1_000_000
    """`auto` searches approximately from this many corpus texts on."""
    ann_lists: Optional[int] = None
    """Inverted lists (k-means cells) of the approximate index; default about 4 sqrt(corpus)."""
    ann_probe: int = 32
    """Cells searched per query: more finds more of the true neighbours, at proportional cost."""
    ann_encoding: str = "fp16"
    """How the index stores vectors: `fp16` (2 bytes a feature) or `sq8` (1 byte, coarser scores)."""

    def __post_init__(self):
        for name in ("num_negatives", "skip_top"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("pool_size", "batch_size", "encode_chunk", "query_block", "corpus_block"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_size < self.num_negatives:
            raise InputError(f"pool_size ({self.pool_size}) must be >= num_negatives ({self.num_negatives})")
        for name in ("absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and not numpy.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value}")
        if self.search_depth is not None and self.search_depth < self.skip_top + self.pool_size:
            raise InputError(f"search_depth ({self.search_depth}) must be >= skip_top + pool_size "
                             f"({self.skip_top + self.pool_size})")
        if self.query_prompt not in ("query", "none"):
            raise InputError(f"query_prompt must be query or none, got {self.query_prompt!r}")
        if self.search not in ("auto", "exact", "ann"):
            raise InputError(f"search must be auto, exact or ann, got {self.search!r}")
        if self.ann_encoding not in ANN_ENCODINGS:
            raise InputError(f"ann_encoding must be one of {sorted(ANN_ENCODINGS)}, got {self.ann_encoding!r}")
        for name in ("ann_probe", "ann_min_corpus"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ann_lists is not None and self.ann_lists < 1:
            raise InputError(f"ann_lists must be >= 1, got {self.ann_lists}")

    def depth(self) -> int:
        return self.search_depth or self.skip_top + self.pool_size + 32

    def search_for(self, corpus_size: int) -> str:
        """`exact` or `ann` for a corpus of this size (see `search`)."""
        if self.search != "auto":
            return self.search
        if corpus_size < self.ann_min_corpus:
            return "exact"
        try:
            import faiss  # noqa: F401
        except ImportError:
            logger.warning("%d corpus texts: exact search (install the `ann` extra, faiss-cpu, for approximate "
                           "search at this size)", corpus_size)
            return "exact"
        return "ann"

    def top_k(self, queries, corpus, show_progress: bool = False):
        """(scores, indices) of the `depth()` best corpus rows per query, by the chosen search."""
        if self.search_for(len(corpus)) == "ann":
            return ann_top_k(queries, corpus, self.depth(), lists=self.ann_lists, probe=self.ann_probe,
                             encoding=self.ann_encoding, show_progress=show_progress)
        return exact_top_k(queries, corpus, self.depth(), query_block=self.query_block,
                           corpus_block=self.corpus_block, show_progress=show_progress)


@dataclasses.dataclass
class Example:
    """One input record to mine for."""

    line: int
    """1-based input line."""
    record: Dict[str, Any]
    """The record as read (other fields are written back unchanged)."""
    query: str
    positive: str
    prefix: Optional[str]
    """Prompt text in front of the query (None until :func:`mine_file` fills in the model's own
    query prompt for a record without an instruction)."""


def read_examples(path: str) -> List[Example]:
    """The (query, positive) records of a contrastive JSONL file; other tasks are refused by line.
    Needs no model: a tool reads its input before it loads one."""
    examples = []
    for number, record in iter_jsonl_records(path):
        task = record.get("task", "pair")
        if task not in MINABLE_TASKS:
            raise DataError(f"{path}:{number}: task {task!r} has no (query, positive) to mine for; "
                            f"expected one of {sorted(MINABLE_TASKS)}")
        instruction = record.get("instruction")
        prefix = format_instruction(record_text(record, "instruction", path, number)) if instruction is not None \
            else None
        spec = BY_NAME[task]
        examples.append(Example(number, record, record_text(record, spec.anchor, path, number),
                                record_text(record, spec.positive, path, number), prefix))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _embed_to_memmap(embedder, texts: Sequence[str], path: str, config: MiningConfig, show_progress: bool,
                     prefixes: Optional[Sequence[str]] = None) -> numpy.ndarray:
    """Embeddings [len(texts), dim] written chunk by chunk into a .npy memory map."""
    if not texts:
        return numpy.zeros((0, embedder.dim), dtype=numpy.float32)  # an empty file cannot be mapped
    store = numpy.lib.format.open_memmap(path, mode="w+", dtype=numpy.float32, shape=(len(texts), embedder.dim))
    for start in range(0, len(texts), config.encode_chunk):
        stop = min(start + config.encode_chunk, len(texts))
        if prefixes is None:
            store[start:stop] = embedder.encode(texts[start:stop], prompt_name="none", batch_size=config.batch_size,
                                                show_progress=show_progress)
            continue
        by_prefix: Dict[str, List[int]] = defaultdict(list)
        for row in range(start, stop):
            by_prefix[prefixes[row]].append(row)
        for prefix, rows in by_prefix.items():
            store[rows] = embedder.encode([texts[row] for row in rows], prompt_text=prefix,
                                          batch_size=config.batch_size, show_progress=show_progress)
    store.flush()
    return store


def select_pool(ranked_indices: numpy.ndarray, ranked_scores: numpy.ndarray, excluded: set,
                positive_score: float, config: MiningConfig) -> List[int]:
    """Corpus indices of one query's pool from its ranking (best first); see the module docstring."""
    pool: List[int] = []
    skipped = 0
    for index, score in zip(ranked_indices.tolist(), ranked_scores.tolist()):
        if index in excluded:
            continue
        if skipped < config.skip_top:
            skipped += 1
            continue
        if config.max_score is not None and score > config.max_score:
            continue
        if config.absolute_margin is not None and score > positive_score - config.absolute_margin:
            continue
        if config.relative_margin is not None and score > positive_score - config.relative_margin * abs(positive_score):
            continue
        pool.append(index)
        if len(pool) == config.pool_size:
            break
    return pool


def mine_hard_negatives(examples: List[Example], corpus: List[str], embedder, config: MiningConfig,
                        work_dir: str, show_progress: bool = False) -> Tuple[List[List[int]], Dict[str, Any]]:
    """Each example's pool (indices into `corpus`, which must hold unique texts) and a report."""
    corpus_index = {text: index for index, text in enumerate(corpus)}
    positives_of_query: Dict[Tuple[str, str], set] = defaultdict(set)
    for example in examples:
        if example.positive in corpus_index:
            positives_of_query[(example.prefix, example.query)].add(corpus_index[example.positive])
    corpus_vectors = _embed_to_memmap(embedder, corpus, os.path.join(work_dir, "corpus.npy"), config, show_progress)
    query_vectors = _embed_to_memmap(embedder, [example.query for example in examples],
                                     os.path.join(work_dir, "queries.npy"), config, show_progress,
                                     prefixes=[example.prefix for example in examples])
    # positives already in the corpus are not embedded twice
    missing = [row for row, example in enumerate(examples) if example.positive not in corpus_index]
    extra_vectors = _embed_to_memmap(embedder, [examples[row].positive for row in missing],
                                     os.path.join(work_dir, "positives.npy"), config, show_progress)
    extra_row = {row: position for position, row in enumerate(missing)}

    def positive_vector(row: int) -> numpy.ndarray:
        if row in extra_row:
            return extra_vectors[extra_row[row]]
        return corpus_vectors[corpus_index[examples[row].positive]]

    scores, indices = config.top_k(query_vectors, corpus_vectors, show_progress)
    pools: List[List[int]] = []
    too_few, short_pools, positive_scores = [], 0, []
    for row, example in enumerate(examples):
        positive_score = float(numpy.dot(query_vectors[row], positive_vector(row)))
        positive_scores.append(positive_score)
        pool = select_pool(indices[row], scores[row], positives_of_query[(example.prefix, example.query)],
                           positive_score, config)
        pools.append(pool)
        if len(pool) < config.num_negatives:
            too_few.append({"line": example.line, "pool_size": len(pool)})
        if len(pool) < config.pool_size:
            short_pools += 1
    report = {
        "examples": len(examples), "corpus_texts": len(corpus), "search_depth": config.depth(),
        "search": config.search_for(len(corpus)),
        "config": dataclasses.asdict(config),
        "too_few_negatives": {"count": len(too_few), "examples": too_few[:REPORT_EXAMPLES]},
        "pools_shorter_than_pool_size": short_pools,
        "mean_pool_size": float(numpy.mean([len(pool) for pool in pools])),
        "mean_positive_score": float(numpy.mean(positive_scores)),
        "negative_slots": negative_slot_report(examples, pools, corpus_index, config.num_negatives),
    }
    return pools, report


def negative_slot_report(examples: List[Example], pools: List[List[int]], corpus_index: Dict[str, int],
                         num_negatives: int) -> Dict[str, Any]:
    """How varied the chosen negatives (each pool's first `num_negatives`) are. Hubs, texts close to
    every query, show as few distinct texts over many slots and one text in many examples' slots; a
    slot holding another example's positive is a likely false negative."""
    uses: Dict[int, int] = defaultdict(int)
    for pool in pools:
        for index in pool[:num_negatives]:
            uses[index] += 1
    slots = sum(uses.values())
    positives = {corpus_index[example.positive] for example in examples if example.positive in corpus_index}
    most = max(uses.values(), default=0)
    return {"slots": slots, "distinct_texts": len(uses),
            "distinct_per_slot": len(uses) / slots if slots else 0.0,
            "most_used_text_slots": most, "most_used_text_share_of_examples": most / max(len(examples), 1),
            "slots_holding_other_positives": sum(count for index, count in uses.items() if index in positives)}


def mine_file(input_path: str, output_path: str, embedder, config: MiningConfig, corpus_path: Optional[str] = None,
              corpus_field: str = "text", report_path: Optional[str] = None,
              show_progress: bool = False, examples: Optional[List[Example]] = None) -> Dict[str, Any]:
    """Mine `input_path` (contrastive JSONL; `examples`: already read from it by
    :func:`read_examples`) into `output_path`; the corpus is `corpus_path` (JSONL or text lines) or
    else the examples' positives. Returns the report (also written as JSON to `report_path`, default
    ``<output>.report.json``)."""
    examples = examples if examples is not None else read_examples(input_path)
    default_prefix = embedder.prompt_text(config.query_prompt)
    for example in examples:
        if example.prefix is None:
            example.prefix = default_prefix
    texts = read_texts(corpus_path, corpus_field) if corpus_path else [example.positive for example in examples]
    corpus = list(dict.fromkeys(texts))  # unique texts, first occurrence order
    with tempfile.TemporaryDirectory(prefix=".mining-", dir=os.path.dirname(os.path.abspath(output_path))) as work:
        pools, report = mine_hard_negatives(examples, corpus, embedder, config, work, show_progress)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for example, pool in zip(examples, pools):
                texts = [corpus[index] for index in pool]
                record = {**example.record, "task": MINABLE_TASKS[example.record.get("task", "pair")],
                          "negatives": texts[:config.num_negatives], "candidates": texts[config.num_negatives:]}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    write_atomically(output_path, write)
    report.update(input=input_path, output=output_path, corpus=corpus_path or "(the positives)", model=embedder.name)
    save_json(report_path or output_path + ".report.json", report)
    return report
