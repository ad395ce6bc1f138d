"""Contrastive (embedding) data: the JSONL schema, its tokenized on-disk store, and the loader.

Schema (one JSON object per line; see data/README.md for the full table):
    pair            {"task": "pair", "query", "positive"}                       (stage 3)
    retrieval, clr  {"task", "query", "positive", "negatives"?: [..], "candidates"?: [..],
                     "language"?, "instruction"?}                                (stage 4)
    classification  {"task", "text", "label", "negative_labels": [..], "instruction"?}
    sts             {"task", "text1", "text2", "score": number, "instruction"?}

Store `<prefix>` (written by `tokenize_contrastive`, i.e. tools/tokenize_contrastive.py):
    <prefix>.bin/.idx       megatron-core indexed dataset; one document per example whose sequences
                            are its texts, in order: anchor, positive, negatives..., candidates...,
                            then the formatted instruction if the example has one. Raw ids, no EOD.
    <prefix>.examples.npy   one `EXAMPLE_DTYPE` row per example (task code, first sequence, counts,
                            language code, score), mmap-able.
    <prefix>.meta.json      task names, language table, counts, tokenizer identity.
The .idx is renamed into place last: a store is complete when all four files exist.

`ContrastiveLoader` yields single-task `ContrastiveBatch`es, sharded across data-parallel ranks
without overlap and resumable with `state_dict()` / `load_state_dict()`.
"""

import dataclasses
import hashlib
import json
import os
from collections import Counter
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron_conan.data.encoders import CONTRASTIVE_TASKS, INSTRUCTION_TEMPLATE, format_instruction
from megatron_conan.data.pipeline import EncodedBatch
from megatron_conan.data.preprocess import PreprocessConfig, PreprocessResult, run_to_indexed

STORE_FORMAT = "megatron_conan.contrastive"
STORE_VERSION = 1
EXAMPLES_SUFFIX = ".examples.npy"
META_SUFFIX = ".meta.json"
TASK_CODES = {task: code for code, task in enumerate(CONTRASTIVE_TASKS)}
RETRIEVAL_TASKS = ("retrieval", "clr")
EXAMPLE_DTYPE = numpy.dtype([
    ("first_sequence", "<i8"),   # index of the example's anchor sequence in the indexed dataset
    ("task", "u1"),              # code into CONTRASTIVE_TASKS
    ("has_instruction", "u1"),   # 1 when the last sequence is the example's own instruction
    ("num_negatives", "<u2"),    # negatives (classification: negative labels)
    ("num_candidates", "<u2"),   # ranked DHNM candidate pool beyond the negatives
    ("language", "<i2"),         # code into meta["languages"], -1 when absent
    ("score", "<f4"),            # STS gold score, NaN for other tasks
])


# -- tokenizing -------------------------------------------------------------------------------

def _model_sha256(path: str) -> str:
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def tokenize_contrastive(config: PreprocessConfig) -> PreprocessResult:
    """Tokenizes contrastive JSONL into the store at `config.output_prefix` (atomically; bad lines
    are counted and located, `strict` stops at the first)."""
    config = dataclasses.replace(config, format="contrastive")
    languages: Dict[str, int] = {}
    chunks: List[numpy.ndarray] = []

    def collect(batch: EncodedBatch, first_sequence: int) -> None:
        rows = numpy.zeros(len(batch.records), dtype=EXAMPLE_DTYPE)
        starts = numpy.concatenate([[0], numpy.cumsum(batch.sequences_per_document)[:-1]])
        rows["first_sequence"] = first_sequence + starts
        for row, record in zip(rows, batch.records):
            row["task"] = TASK_CODES[record["task"]]
            row["has_instruction"] = record["has_instruction"]
            row["num_negatives"] = record["num_negatives"]
            row["num_candidates"] = record["num_candidates"]
            language = record["language"]
            row["language"] = -1 if language is None else languages.setdefault(language,
                                                                               len(languages))
            row["score"] = record["score"]
        chunks.append(rows)

    def write_index_files(writer) -> None:
        examples = (numpy.concatenate(chunks) if chunks
                    else numpy.zeros(0, dtype=EXAMPLE_DTYPE))
        with open(writer.tmp_path(EXAMPLES_SUFFIX), "wb") as stream:
            numpy.save(stream, examples)
        counts = Counter(int(code) for code in examples["task"])
        meta = {
            "format": STORE_FORMAT, "version": STORE_VERSION,
            "tasks": list(CONTRASTIVE_TASKS),
            "languages": sorted(languages, key=languages.get),
            "num_examples": int(len(examples)), "num_sequences": writer.num_sequences,
            "examples_per_task": {task: counts.get(code, 0) for task, code in TASK_CODES.items()},
            "instruction_template": INSTRUCTION_TEMPLATE,
            "tokenizer_sha256": _model_sha256(config.tokenizer_model),
            "inputs": [os.path.abspath(path) for path in config.inputs],
        }
        with open(writer.tmp_path(META_SUFFIX), "w", encoding="utf-8") as stream:
            json.dump(meta, stream, indent=2, ensure_ascii=False)

    return run_to_indexed(config, (EXAMPLES_SUFFIX, META_SUFFIX), collect, write_index_files)


# -- reading ----------------------------------------------------------------------------------

@dataclasses.dataclass
class ContrastiveExample:
    """One example's token ids, by role (`anchor` is the query, classification text or text1)."""

    example_id: int
    task: str
    anchor: numpy.ndarray
    positive: numpy.ndarray
    negatives: List[numpy.ndarray]
    candidates: List[numpy.ndarray]
    instruction: Optional[numpy.ndarray]
    score: Optional[float]
    language: Optional[str]


class ContrastiveStore:
    """Random access to a tokenized contrastive store."""

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        for suffix in (".bin", ".idx", EXAMPLES_SUFFIX, META_SUFFIX):
            if not os.path.exists(path_prefix + suffix):
                raise FileNotFoundError(f"incomplete contrastive store: {path_prefix + suffix} "
                                        f"missing")
        with open(path_prefix + META_SUFFIX, encoding="utf-8") as stream:
            self.meta = json.load(stream)
        if self.meta.get("format") != STORE_FORMAT or self.meta.get("version") != STORE_VERSION:
            raise ValueError(f"{path_prefix}: not a version-{STORE_VERSION} contrastive store")
        self.tasks: List[str] = self.meta["tasks"]
        self.languages: List[str] = self.meta["languages"]
        self.examples = numpy.load(path_prefix + EXAMPLES_SUFFIX, mmap_mode="r")
        self.indexed = IndexedDataset(path_prefix, mmap=True)
        if len(self.examples) != self.meta["num_examples"] or len(
                self.indexed) != self.meta["num_sequences"]:
            raise ValueError(f"{path_prefix}: files disagree with {META_SUFFIX}")

    def __len__(self) -> int:
        return len(self.examples)

    def task_of(self, example_id: int) -> str:
        return self.tasks[int(self.examples[example_id]["task"])]

    def example_ids_of_task(self, task: str) -> numpy.ndarray:
        return numpy.flatnonzero(self.examples["task"] == self.tasks.index(task))

    def sequence(self, sequence_id: int) -> numpy.ndarray:
        return self.indexed[int(sequence_id)]

    def pool_sequence_ids(self, example_id: int) -> numpy.ndarray:
        """Sequence ids of the example's ranked negative pool: its negatives, then its
        candidates (the DHNM pool; position p in the pool is `pool_sequence_ids(i)[p]`)."""
        row = self.examples[example_id]
        start = int(row["first_sequence"]) + 2
        return numpy.arange(start, start + int(row["num_negatives"]) + int(row["num_candidates"]))

    def pool(self, example_id: int) -> List[numpy.ndarray]:
        """Token ids of the example's negative pool (negatives, then candidates)."""
        return [self.sequence(sequence_id) for sequence_id in self.pool_sequence_ids(example_id)]

    def pool_size(self, example_id: int) -> int:
        row = self.examples[example_id]
        return int(row["num_negatives"]) + int(row["num_candidates"])

    def instruction_ids(self, example_id: int) -> Optional[numpy.ndarray]:
        row = self.examples[example_id]
        if not row["has_instruction"]:
            return None
        return self.sequence(int(row["first_sequence"]) + 2 + int(row["num_negatives"])
                             + int(row["num_candidates"]))

    def example(self, example_id: int) -> ContrastiveExample:
        row = self.examples[example_id]
        first = int(row["first_sequence"])
        pool = self.pool(example_id)
        num_negatives = int(row["num_negatives"])
        task = self.tasks[int(row["task"])]
        return ContrastiveExample(
            example_id=int(example_id), task=task,
            anchor=self.sequence(first), positive=self.sequence(first + 1),
            negatives=pool[:num_negatives], candidates=pool[num_negatives:],
            instruction=self.instruction_ids(example_id),
            score=float(row["score"]) if task == "sts" else None,
            language=self.languages[int(row["language"])] if row["language"] >= 0 else None)


# -- loading ----------------------------------------------------------------------------------

@dataclasses.dataclass
class ContrastiveBatch:
    """One single-task batch of one data-parallel rank. Sequences are right-padded with the pad
    id; `*_lengths` are the true lengths (the attention mask). B can be 0 on some ranks for the
    last, partial global batch of a task when `drop_last=False`."""

    task: str
    example_ids: torch.Tensor
    """[B] int64: global example indices in the store (the DHNM state key)."""
    query_ids: torch.Tensor
    """[B, Lq] int64: instruction prefix + query (classification: text; sts: text1)."""
    query_lengths: torch.Tensor
    """[B] int64."""
    positive_ids: torch.Tensor
    """[B, Lp] int64: positive passage (classification: label text; sts: text2)."""
    positive_lengths: torch.Tensor
    """[B] int64."""
    negative_ids: Optional[torch.Tensor] = None
    """[B * K, Ln] int64, example-major (rows k*... of example b are b*K .. b*K+K-1); None for pair
    and sts. K is the loader's num_negatives (retrieval/clr) or the most negative labels in the
    batch (classification)."""
    negative_lengths: Optional[torch.Tensor] = None
    """[B * K] int64."""
    negative_mask: Optional[torch.Tensor] = None
    """[B, K] bool: False marks a padding slot (the example had fewer negatives)."""
    negative_pool_positions: Optional[torch.Tensor] = None
    """[B, K] int64: which entry of the example's pool fills each slot, -1 for padding."""
    scores: Optional[torch.Tensor] = None
    """[B] float32 STS gold scores (sts only)."""
    languages: List[Optional[str]] = dataclasses.field(default_factory=list)
    """Per example: the `language` field (clr), else None."""
    epoch: int = 0
    step: int = 0
    """Position of this batch: the loader's state before it was drawn was (epoch, step)."""

    @property
    def size(self) -> int:
        return int(self.example_ids.numel())


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int):
    """([n, L] int64 right-padded ids, [n] int64 lengths), L the longest length (at least 1)."""
    lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.int64)
    width = max(int(lengths.max()) if len(sequences) else 0, 1)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.as_tensor(numpy.asarray(sequence, dtype=numpy.int64))
    return ids, lengths


NegativePicker = Callable[[int, int], Sequence[int]]
"""(example_id, pool_size) -> pool positions to use as this example's negatives, best first."""


class ContrastiveLoader:
    """Single-task batches from a contrastive store for one data-parallel rank.

    Epoch plan (the same on every rank, from the seed alone): each task's examples are permuted
    (seed, epoch, task), cut into global batches of `batch_size[task] * dp_world_size`, and the
    global batches of all tasks are shuffled together (seed, epoch), so tasks are mixed in
    proportion to their sizes. Rank r takes the r-th of `dp_world_size` near-equal slices of each
    global batch: every example is seen exactly once per epoch across ranks (with `drop_last`,
    the partial last global batch of each task is skipped instead).

    Queries get the instruction prefix `Instruct: {instruction}\\nQuery: ` from the example's own
    `instruction` or else `instructions[task]`; sts prefixes both texts; passages and labels get
    none. With `append_eod`, EOD ends every sequence (after truncation to the max lengths).
    Retrieval/clr negatives fill `num_negatives` slots from the example's pool (negatives, then
    candidates); set `negative_picker` (DHNM) to choose the pool positions per example.
    """

    def __init__(self, path_prefix: str, tokenizer, batch_size: Union[int, Mapping[str, int]],
                 instructions: Optional[Mapping[str, str]] = None, dp_rank: int = 0,
                 dp_world_size: int = 1, seed: int = 1234, max_query_length: int = 512,
                 max_passage_length: int = 512, num_negatives: int = 7,
                 tasks: Optional[Sequence[str]] = None, drop_last: bool = False,
                 append_eod: bool = True, negative_picker: Optional[NegativePicker] = None):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world_size={dp_world_size})")
        if max_query_length < 2 or max_passage_length < 2:
            raise ValueError("max_query_length and max_passage_length must be >= 2")
        if num_negatives < 0:
            raise ValueError("num_negatives must be >= 0")
        self.store = ContrastiveStore(path_prefix)
        self._check_tokenizer(tokenizer)
        self.pad_id = tokenizer.pad_id
        self.eod_id = tokenizer.eod_id
        self.dp_rank, self.dp_world_size, self.seed = dp_rank, dp_world_size, seed
        self.max_query_length, self.max_passage_length = max_query_length, max_passage_length
        self.num_negatives = num_negatives
        self.drop_last = drop_last
        self.append_eod = append_eod
        self.negative_picker = negative_picker
        available = [task for task in CONTRASTIVE_TASKS
                     if self.store.meta["examples_per_task"].get(task, 0) > 0]
        unknown = set(tasks or ()) - set(CONTRASTIVE_TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; expected {CONTRASTIVE_TASKS}")
        self.tasks = [task for task in available if tasks is None or task in tasks]
        if not self.tasks:
            raise ValueError(f"{path_prefix}: no examples of tasks {tasks or CONTRASTIVE_TASKS}")
        self.batch_sizes = {task: (batch_size if isinstance(batch_size, int) else batch_size[task])
                            for task in self.tasks}
        if any(size < 1 for size in self.batch_sizes.values()):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        self.instruction_ids = {task: list(tokenizer.encode(format_instruction(text)))
                                for task, text in (instructions or {}).items()}
        self._task_ids = {task: self.store.example_ids_of_task(task) for task in self.tasks}
        self.epoch = 0
        self.step = 0
        self._plan_epoch: Optional[int] = None
        self._plan: List[tuple] = []
        self._orders: Dict[str, numpy.ndarray] = {}

    def _check_tokenizer(self, tokenizer) -> None:
        identifiers = getattr(tokenizer, "unique_identifiers", None) or {}
        expected = self.store.meta.get("tokenizer_sha256")
        found = identifiers.get("model_sha256")
        if found is not None and expected is not None and found != expected:
            raise ValueError(f"{self.store.path_prefix} was tokenized with another tokenizer "
                             f"(sha256 {expected[:12]}..., given {found[:12]}...)")

    # -- the epoch plan --
    def _global_batch(self, task: str) -> int:
        return self.batch_sizes[task] * self.dp_world_size

    def _num_global_batches(self, task: str) -> int:
        count, size = len(self._task_ids[task]), self._global_batch(task)
        return count // size if self.drop_last else -(-count // size)

    @property
    def steps_per_epoch(self) -> int:
        return sum(self._num_global_batches(task) for task in self.tasks)

    def _ensure_plan(self, epoch: int) -> None:
        if self._plan_epoch == epoch:
            return
        self._orders = {
            task: numpy.random.default_rng([self.seed, epoch, 1 + TASK_CODES[task]]).permutation(
                self._task_ids[task]) for task in self.tasks}
        plan = [(task, index) for task in self.tasks
                for index in range(self._num_global_batches(task))]
        shuffle = numpy.random.default_rng([self.seed, epoch]).permutation(len(plan))
        self._plan = [plan[position] for position in shuffle]
        self._plan_epoch = epoch

    def rank_example_ids(self, epoch: int, step: int) -> tuple:
        """(task, this rank's example ids) of batch `step` of `epoch`."""
        self._ensure_plan(epoch)
        task, index = self._plan[step]
        size = self._global_batch(task)
        global_batch = self._orders[task][index * size:(index + 1) * size]
        return task, numpy.array_split(global_batch, self.dp_world_size)[self.dp_rank]

    # -- batches --
    def _finish(self, ids: Sequence[int], max_length: int, prefix: Optional[Sequence[int]] = None):
        ids = list(prefix or ()) + [int(token) for token in ids]
        if self.append_eod:
            return ids[:max_length - 1] + [self.eod_id]
        return ids[:max_length]

    def _query_prefix(self, example_id: int, task: str) -> Optional[List[int]]:
        own = self.store.instruction_ids(example_id)
        return list(own) if own is not None else self.instruction_ids.get(task)

    def _pick_negatives(self, example_id: int, pool_size: int, slots: int) -> List[int]:
        if self.negative_picker is None:
            return list(range(min(slots, pool_size)))
        positions = [int(position) for position in self.negative_picker(example_id, pool_size)]
        if any(not 0 <= position < pool_size for position in positions):
            raise ValueError(f"negative_picker gave positions {positions} outside the pool of "
                             f"{pool_size} of example {example_id}")
        return positions[:slots]

    def make_batch(self, task: str, example_ids: numpy.ndarray, epoch: int = 0,
                   step: int = 0) -> ContrastiveBatch:
        """The batch of these examples (all of `task`)."""
        queries, positives, languages, scores = [], [], [], []
        negative_pools = []
        for example_id in example_ids:
            example = self.store.example(int(example_id))
            prefix = self._query_prefix(int(example_id), task)
            queries.append(self._finish(example.anchor, self.max_query_length, prefix))
            positive_prefix = prefix if task == "sts" else None
            max_positive = self.max_query_length if task == "sts" else self.max_passage_length
            positives.append(self._finish(example.positive, max_positive, positive_prefix))
            languages.append(example.language)
            scores.append(example.score)
            negative_pools.append(example.negatives + example.candidates)
        query_ids, query_lengths = pad_sequences(queries, self.pad_id)
        positive_ids, positive_lengths = pad_sequences(positives, self.pad_id)
        batch = ContrastiveBatch(task, torch.as_tensor(numpy.asarray(example_ids, dtype=numpy.int64)),
                                 query_ids, query_lengths, positive_ids, positive_lengths,
                                 languages=languages, epoch=epoch, step=step)
        if task == "sts":
            batch.scores = torch.tensor(scores, dtype=torch.float32)
        elif task in RETRIEVAL_TASKS or task == "classification":
            self._add_negatives(batch, task, example_ids, negative_pools)
        return batch

    def _add_negatives(self, batch: ContrastiveBatch, task: str, example_ids,
                       pools: List[List[numpy.ndarray]]) -> None:
        if task == "classification":
            # every negative label is used; the pool is only the negative labels
            slots = max((len(pool) for pool in pools), default=0)
            chosen = [list(range(len(pool))) for pool in pools]
        else:
            slots = self.num_negatives
            chosen = [self._pick_negatives(int(example_id), len(pool), slots)
                      for example_id, pool in zip(example_ids, pools)]
        sequences, positions = [], torch.full((len(pools), slots), -1, dtype=torch.int64)
        for row, (pool, picked) in enumerate(zip(pools, chosen)):
            for slot in range(slots):
                if slot < len(picked):
                    positions[row, slot] = picked[slot]
                    sequences.append(self._finish(pool[picked[slot]], self.max_passage_length))
                else:
                    sequences.append([self.eod_id])  # padding slot, masked out
        batch.negative_ids, batch.negative_lengths = pad_sequences(sequences, self.pad_id)
        batch.negative_mask = positions >= 0
        batch.negative_pool_positions = positions

    def __iter__(self) -> Iterator[ContrastiveBatch]:
        """Batches from the current position on, epoch after epoch, without end."""
        steps = self.steps_per_epoch
        while True:
            epoch, step = self.epoch, self.step
            task, example_ids = self.rank_example_ids(epoch, step)
            batch = self.make_batch(task, example_ids, epoch, step)
            # advance before yielding, so state_dict() always names the next batch
            self.epoch, self.step = (epoch + 1, 0) if step + 1 >= steps else (epoch, step + 1)
            yield batch

    # -- resume --
    def state_dict(self) -> Dict[str, int]:
        """The position of the next batch, plus what the plan depends on (checked on load)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "dp_world_size": self.dp_world_size, "num_examples": len(self.store),
                "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "dp_world_size", "num_examples", "steps_per_epoch"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"cannot resume: {key} was {state.get(key)}, now {mine} (the "
                                 f"epoch plan depends on it)")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
