"""Contrastive (embedding) data: the store's reader and the loader.

Records and what each task implies (fields, store layout, hard-negative slots, loss) are the task
table's (`megatron_conan/tasks.py`; data/README.md has the schema); the store's files and row
format are `contrastive_format.py`, which the writer (`preprocess/contrastive_tokenize.py`) shares.

`ContrastiveStore` reads a store; `ContrastiveLoader` yields single-task `ContrastiveBatch`es: the
task of each step is drawn by weights, each task walks its own permutation, the global batch is
sharded across data-parallel ranks without overlap, and the position is resumable with
`state_dict()` / `load_state_dict()`.
"""

import dataclasses
import json
import logging
import math
import os
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron_conan.data.contrastive_format import (
    EXAMPLES_SUFFIX,
    STORE_SUFFIXES,
    TASK_CODES,
    check_store_meta,
    prompt_token_count,
)
from megatron_conan.data.provenance import META_SUFFIX
from megatron_conan.errors import CheckpointMismatchError, ConfigError, DataError
from megatron_conan.tasks import BY_NAME, NEGATIVES_LABELS, NEGATIVES_MINED, TASK_NAMES, check_instructions, paper_task_weights

logger = logging.getLogger(__name__)

LOADER_STATE_VERSION = 2
"""Version 2: a step counter and each task's (epoch, cursor) (version 1 had one epoch plan)."""
PAPER_TASK_WEIGHTS = paper_task_weights()
"""The paper's stage-4 mix in millions of examples (docs/DESIGN.md section 5): default task weights."""


# -- reading ----------------------------------------------------------------------------------

@dataclasses.dataclass
class ContrastiveExample:
    """One example's token ids, by role (`anchor` is the query, classification text or text1;
    `instructed`: the anchor, and for sts the positive, include the instruction)."""

    example_id: int
    task: str
    anchor: numpy.ndarray
    positive: numpy.ndarray
    negatives: List[numpy.ndarray]
    candidates: List[numpy.ndarray]
    instructed: bool
    prompt_length: int
    """Tokens of the instruction prompt at the start of the anchor (sts: of both texts); 0 if none."""
    score: Optional[float]
    language: Optional[str]


class ContrastiveStore:
    """Random access to a tokenized contrastive store."""

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        for suffix in STORE_SUFFIXES:
            if not os.path.exists(path_prefix + suffix):
                raise FileNotFoundError(f"incomplete contrastive store: {path_prefix + suffix} "
                                        f"missing")
        with open(path_prefix + META_SUFFIX, encoding="utf-8") as stream:
            self.meta = json.load(stream)
        check_store_meta(path_prefix, self.meta)
        self.tasks: List[str] = self.meta["tasks"]
        self.languages: List[str] = self.meta["languages"]
        self.instructions: Dict[str, str] = self.meta.get("instructions", {})
        """Per task, the tokenize-time instruction of examples without their own."""
        self.examples = numpy.load(path_prefix + EXAMPLES_SUFFIX, mmap_mode="r")
        self._version2_prompt_lengths: Optional[Dict[str, int]] = None
        self.indexed = IndexedDataset(path_prefix, mmap=True)
        if len(self.examples) != self.meta["num_examples"] or len(
                self.indexed) != self.meta["num_sequences"]:
            raise DataError(f"{path_prefix}: files disagree with {META_SUFFIX}")

    def __len__(self) -> int:
        return len(self.examples)

    def task_of(self, example_id: int) -> str:
        return self.tasks[int(self.examples[example_id]["task"])]

    def example_ids_of_task(self, task: str) -> numpy.ndarray:
        """The task's example ids, ascending. int32 below 2**31 examples: every rank's loader keeps
        these and a permutation of them, 8 bytes a pair instead of 16 (13.6 GB a rank at the paper's
        1.7B pairs; docs/SCALE.md section 2). A store of one task is not scanned."""
        dtype = numpy.int32 if len(self.examples) < 2**31 else numpy.int64
        if self.meta["examples_per_task"].get(task) == len(self.examples):
            return numpy.arange(len(self.examples), dtype=dtype)
        return numpy.flatnonzero(self.examples["task"] == self.tasks.index(task)).astype(dtype)

    def location(self, example_id: int) -> str:
        """`file:line` of the example in the tokenizer's inputs."""
        row = self.examples[example_id]
        return f"{self.meta['inputs'][int(row['input'])]}:{int(row['line'])}"

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

    def pool_sizes(self) -> numpy.ndarray:
        """[num_examples] int64: every example's pool size (negatives + candidates)."""
        return (self.examples["num_negatives"].astype(numpy.int64)
                + self.examples["num_candidates"].astype(numpy.int64))

    def prompt_length(self, example_id: int) -> int:
        """Tokens of the instruction prompt at the start of the example's anchor (0 when it has none).

        A version-2 store did not record it: after `use_task_prompt_lengths(tokenizer)`, an
        instructed row there is taken to carry its task's tokenize-time instruction (a record's own
        instruction cannot be recovered); without, 0 (the prompt is pooled with the text)."""
        row = self.examples[example_id]
        if "prompt_length" in row.dtype.names:
            return int(row["prompt_length"])
        if not row["instructed"] or self._version2_prompt_lengths is None:
            return 0
        return self._version2_prompt_lengths.get(self.task_of(example_id), 0)

    def use_task_prompt_lengths(self, tokenizer) -> None:
        """Version-2 stores: count each task's instruction prompt with `tokenizer` (see prompt_length)."""
        self._version2_prompt_lengths = {task: prompt_token_count(tokenizer, instruction)
                                         for task, instruction in self.instructions.items()}

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
            instructed=bool(row["instructed"]), prompt_length=self.prompt_length(example_id),
            score=float(row["score"]) if BY_NAME[task].score_field else None,
            language=self.languages[int(row["language"])] if row["language"] >= 0 else None)


# -- loading ----------------------------------------------------------------------------------

@dataclasses.dataclass
class ContrastiveBatch:
    """One single-task batch of one data-parallel rank. Sequences are right-padded with the pad
    id; `*_lengths` are the true lengths (the attention mask). B can be 0 on some ranks for the
    last, partial global batch of a task's epoch when `drop_last=False`."""

    task: str
    example_ids: torch.Tensor
    """[B] int64: global example indices in the store (the DHNM state key)."""
    query_ids: torch.Tensor
    """[B, Lq] int64: the query (classification: text; sts: text1), instructed as one string."""
    query_lengths: torch.Tensor
    """[B] int64."""
    positive_ids: torch.Tensor
    """[B, Lp] int64: positive passage (classification: label text; sts: text2)."""
    positive_lengths: torch.Tensor
    """[B] int64."""
    query_prompt_lengths: Optional[torch.Tensor] = None
    """[B] int64: tokens of the instruction prompt at the start of each query (0: none); pooling
    leaves them out unless `embedding.pool_prompt`."""
    positive_prompt_lengths: Optional[torch.Tensor] = None
    """[B] int64: the same for the positives (only sts positives are instructed; else zeros)."""
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
    """The task's epoch (pass over its examples) this batch was drawn from."""
    step: int = 0
    """The loader step (global batch number, counted over all tasks) of this batch."""

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
"""(example_id, pool_size) -> pool positions to use as this example's negatives, best first,
distinct. A picker may also have `prepare(global_example_ids)`: the loader calls it on every rank
with the whole global batch (the same array everywhere) before it builds a retrieval/clr batch, so
a picker whose state is sharded over ranks (DHNM) can fetch it in one collective."""


@dataclasses.dataclass
class PoolReport:
    """Retrieval/clr examples with fewer hard negatives than the loader's K (counted, located)."""

    num_negatives: int
    """The K the loader fills per query."""
    empty: int = 0
    """Examples whose pool is empty: in-batch negatives only."""
    short: int = 0
    """Examples with 0 < pool < K: the remaining slots are masked."""
    empty_examples: List[str] = dataclasses.field(default_factory=list)
    """The first empty ones, as `example <id> (<file>:<line>)`."""

    def format(self) -> str:
        text = (f"{self.empty} retrieval/clr examples have an empty negative pool and "
                f"{self.short} fewer than {self.num_negatives} negatives (the missing slots are "
                f"masked)")
        return text + (f"; empty: {', '.join(self.empty_examples)}" if self.empty_examples else "")


def pool_report(store: ContrastiveStore, tasks: Sequence[str], num_negatives: int,
                max_examples: int = 10) -> PoolReport:
    """Counts the retrieval/clr examples of `tasks` whose pool holds fewer than `num_negatives`."""
    report = PoolReport(num_negatives)
    codes = [store.tasks.index(task) for task in tasks if BY_NAME[task].negatives == NEGATIVES_MINED]
    if num_negatives <= 0 or not codes:
        return report  # nothing to count (stage 3: pairs only), and no pass over every example
    selected = numpy.isin(store.examples["task"], codes)
    sizes = store.pool_sizes()
    empty = numpy.flatnonzero(selected & (sizes == 0))
    report.empty = int(len(empty))
    report.short = int((selected & (sizes > 0) & (sizes < num_negatives)).sum())
    report.empty_examples = [f"example {int(example_id)} ({store.location(int(example_id))})"
                             for example_id in empty[:max_examples]]
    return report


class _TaskDraw:
    """The task of every loader step: drawn from (seed, step) alone, so every rank (and every DP
    size) draws the same sequence and a resumed run continues it."""

    _STREAM = 0x7A5C  # separates the draws' random stream from the permutations'

    def __init__(self, probabilities: Mapping[str, float], seed: int):
        self.tasks = list(probabilities)
        self.cumulative = numpy.cumsum([probabilities[task] for task in self.tasks])
        self.cumulative /= self.cumulative[-1]
        self.seed = seed

    def __call__(self, step: int) -> str:
        if len(self.tasks) == 1:
            return self.tasks[0]
        uniform = numpy.random.default_rng([self.seed, self._STREAM, step]).random()
        index = int(numpy.searchsorted(self.cumulative, uniform, side="right"))
        return self.tasks[min(index, len(self.tasks) - 1)]


class ContrastiveLoader:
    """Single-task batches from a contrastive store for one data-parallel rank.

    Task of each step: drawn by `task_weights` from (seed, step) alone (`_TaskDraw`): the paper's
    mix by default (`PAPER_TASK_WEIGHTS`, normalised over the tasks present), `"size"` for
    proportions of the tasks' example counts, or a mapping task -> weight. A single task needs no
    weights. Each task walks its own per-epoch permutation (seed, task epoch, task) with a cursor:
    a step takes the next `batch_size[task] * dp_world_size` examples of its task (the global
    batch), and rank r takes the r-th of `dp_world_size` near-equal slices. So the global batches
    depend on the global batch sizes, not on how they split over ranks: DP=1 with batch b*k and
    DP=k with batch b see the same global batches in the same order, and a run resumes under
    another DP size with the same global batch. Every example of a task is drawn once per task
    epoch; the last global batch of a task's epoch is partial (ranks' sizes may differ by one, or
    be 0) unless `drop_last` skips it.

    Instructions are applied at tokenize time (the query is one formatted string, exactly as a
    sentence-transformers prompt tokenizes): `instructions` here only checks that the store was
    tokenized with them. With `append_eod`, EOD ends every sequence (after truncation to the max
    lengths). Retrieval/clr negatives fill `num_negatives` slots from the example's pool
    (negatives, then candidates), missing ones masked; `negative_picker` (DHNM) chooses the pool
    positions per example.
    """

    def __init__(self, path_prefix: str, tokenizer, batch_size: Union[int, Mapping[str, int]],
                 instructions: Optional[Mapping[str, str]] = None, dp_rank: int = 0,
                 dp_world_size: int = 1, seed: int = 1234, max_query_length: int = 512,
                 max_passage_length: int = 512, num_negatives: int = 7,
                 tasks: Optional[Sequence[str]] = None, drop_last: bool = False,
                 append_eod: bool = True, negative_picker: Optional[NegativePicker] = None,
                 task_weights: Union[None, str, Mapping[str, float]] = None):
        if not 0 <= dp_rank < dp_world_size:
            raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_world_size={dp_world_size})")
        if max_query_length < 2 or max_passage_length < 2:
            raise ConfigError("max_query_length and max_passage_length must be >= 2")
        if num_negatives < 0:
            raise ConfigError("num_negatives must be >= 0")
        self.store = ContrastiveStore(path_prefix)
        self._check_tokenizer(tokenizer)
        self._check_instructions(instructions)
        if self.store.meta.get("version") == 2:
            self.store.use_task_prompt_lengths(tokenizer)
        self.pad_id = tokenizer.pad_id
        self.eod_id = tokenizer.eod_id
        self.dp_rank, self.dp_world_size, self.seed = dp_rank, dp_world_size, seed
        self.max_query_length, self.max_passage_length = max_query_length, max_passage_length
        self.num_negatives = num_negatives
        self.drop_last = drop_last
        self.append_eod = append_eod
        self.negative_picker = negative_picker
        unknown = set(tasks or ()) - set(TASK_NAMES)
        if unknown:
            raise ConfigError(f"unknown tasks {sorted(unknown)}; expected {TASK_NAMES}")
        available = [task for task in TASK_NAMES
                     if self.store.meta["examples_per_task"].get(task, 0) > 0]
        self.tasks = [task for task in available if tasks is None or task in tasks]
        if not self.tasks:
            raise DataError(f"{path_prefix}: no examples of tasks {tasks or TASK_NAMES}")
        self.batch_sizes = self._resolve_batch_sizes(batch_size)
        self._task_ids = {task: self.store.example_ids_of_task(task) for task in self.tasks}
        self.task_probabilities = self._resolve_weights(task_weights)
        self.tasks = list(self.task_probabilities)
        if drop_last:
            too_small = [task for task in self.tasks
                         if len(self._task_ids[task]) < self._global_batch(task)]
            if too_small:
                raise ConfigError(f"drop_last: tasks {too_small} have fewer examples than one "
                                  f"global batch, so no batch of them could be drawn")
        self._draw = _TaskDraw(self.task_probabilities, seed)
        self.pool_report = pool_report(self.store, self.tasks, num_negatives)
        if self.pool_report.empty or self.pool_report.short:
            level = logging.WARNING if self.pool_report.empty else logging.INFO
            logger.log(level, "%s: %s", path_prefix, self.pool_report.format())
        self.step = 0
        self.dropped_examples = 0
        """Examples skipped so far as the partial last global batch of a task epoch (drop_last)."""
        self._positions: Dict[str, List[int]] = {task: [0, 0] for task in self.tasks}
        self._orders: Dict[str, Tuple[int, numpy.ndarray]] = {}

    def _check_tokenizer(self, tokenizer) -> None:
        identifiers = getattr(tokenizer, "unique_identifiers", None) or {}
        expected = self.store.meta.get("tokenizer_sha256")
        found = identifiers.get("model_sha256")
        if found is not None and expected is not None and found != expected:
            raise DataError(f"{self.store.path_prefix} was tokenized with another tokenizer "
                            f"(sha256 {expected[:12]}..., given {found[:12]}...)")

    def _check_instructions(self, instructions: Optional[Mapping[str, str]]) -> None:
        """An instruction must be tokenized together with its query, which only the tokenizing
        tool sees as text: a loader-level instruction is accepted only if the store has it."""
        for task, instruction in check_instructions(dict(instructions or {})).items():
            stored = self.store.instructions.get(task)
            if stored != instruction:
                raise ConfigError(
                    f"instruction {instruction!r} for task {task!r} cannot be applied exactly at "
                    f"load time (the query must be tokenized as one string with it); "
                    f"{self.store.path_prefix} was tokenized with "
                    f"{'no default instruction' if stored is None else repr(stored)} for it: "
                    f"re-tokenize with tools/tokenize_contrastive.py --instruction "
                    f"{task}=\"{instruction}\"")

    def _per_task(self, values: Mapping[str, object], what: str, hint: str = "") -> Dict[str, object]:
        """`values` of the selected tasks; names outside TASK_NAMES or a selected task
        without a value are errors that name them."""
        unknown = sorted(set(values) - set(TASK_NAMES))
        if unknown:
            raise ConfigError(f"{what} name unknown tasks {unknown}; tasks are "
                              f"{', '.join(TASK_NAMES)}")
        missing = [task for task in self.tasks if task not in values]
        if missing:
            raise ConfigError(f"{what} give no value for tasks {missing} present in "
                              f"{self.store.path_prefix}{hint}")
        return {task: values[task] for task in self.tasks}

    def _resolve_batch_sizes(self, batch_size: Union[int, Mapping[str, int]]) -> Dict[str, int]:
        if isinstance(batch_size, int):
            sizes = {task: batch_size for task in self.tasks}
        else:
            sizes = {task: int(size) for task, size in
                     self._per_task(batch_size, "batch sizes").items()}
        if any(size < 1 for size in sizes.values()):
            raise ConfigError(f"batch sizes must be >= 1, got {sizes}")
        return sizes

    def _resolve_weights(self, task_weights) -> Dict[str, float]:
        """Normalised draw probabilities of the tasks present, in TASK_NAMES order; tasks
        of weight 0 are never drawn."""
        if len(self.tasks) == 1 and task_weights is None:
            return {self.tasks[0]: 1.0}
        if task_weights == "size":
            weights = {task: float(len(self._task_ids[task])) for task in self.tasks}
        elif task_weights is None or isinstance(task_weights, Mapping):
            given = PAPER_TASK_WEIGHTS if task_weights is None else task_weights
            weights = {task: float(weight) for task, weight in self._per_task(
                given, "task weights", " (give one, 0 to leave a task out, or select tasks)"
            ).items()}
        else:
            raise ConfigError(f"task_weights must be None (the paper's mix), 'size' or a mapping "
                              f"task -> weight, got {task_weights!r}")
        bad = {task: weight for task, weight in weights.items()
               if not math.isfinite(weight) or weight < 0}
        if bad:
            raise ConfigError(f"task weights must be finite and >= 0, got {bad}")
        total = sum(weights.values())
        if total <= 0:
            raise ConfigError(f"task weights are all 0 for the tasks present ({self.tasks})")
        return {task: weight / total for task, weight in weights.items() if weight > 0}

    # -- the plan --
    def _global_batch(self, task: str) -> int:
        return self.batch_sizes[task] * self.dp_world_size

    def batches_per_epoch(self, task: str) -> int:
        """Global batches in one pass over the task's examples."""
        count, size = len(self._task_ids[task]), self._global_batch(task)
        return count // size if self.drop_last else -(-count // size)

    def _order(self, task: str, epoch: int) -> numpy.ndarray:
        cached = self._orders.get(task)
        if cached is None or cached[0] != epoch:
            rng = numpy.random.default_rng([self.seed, epoch, 1 + TASK_CODES[task]])
            cached = (epoch, rng.permutation(self._task_ids[task]))
            self._orders[task] = cached
        return cached[1]

    def _advance(self) -> Tuple[str, int, int, numpy.ndarray]:
        """(task, task epoch, step, global example ids) of the next global batch; moves on."""
        step = self.step
        task = self._draw(step)
        epoch, cursor = self._positions[task]
        order = self._order(task, epoch)
        size = self._global_batch(task)
        global_ids = order[cursor:cursor + size].astype(numpy.int64)  # the order may be int32
        cursor += len(global_ids)
        if cursor >= len(order) or (self.drop_last and cursor + size > len(order)):
            self.dropped_examples += len(order) - cursor  # the skipped tail of the epoch
            self._positions[task] = [epoch + 1, 0]
        else:
            self._positions[task] = [epoch, cursor]
        self.step = step + 1
        return task, epoch, step, global_ids

    def rank_slice(self, global_ids: numpy.ndarray) -> numpy.ndarray:
        """This rank's part of a global batch."""
        return numpy.array_split(global_ids, self.dp_world_size)[self.dp_rank]

    # -- batches --
    def _finish(self, ids: Sequence[int], max_length: int) -> List[int]:
        ids = [int(token) for token in ids]
        if self.append_eod:
            return ids[:max_length - 1] + [self.eod_id]
        return ids[:max_length]

    def _pick_negatives(self, example_id: int, pool_size: int, slots: int) -> List[int]:
        if self.negative_picker is None:
            return list(range(min(slots, pool_size)))
        positions = [int(position) for position in self.negative_picker(example_id, pool_size)]
        if any(not 0 <= position < pool_size for position in positions):
            raise ValueError(f"negative_picker gave positions {positions} outside the pool of "
                             f"{pool_size} of example {example_id}")
        positions = positions[:slots]
        if len(set(positions)) != len(positions):
            raise ValueError(f"negative_picker gave duplicate positions {positions} for example "
                             f"{example_id}: a duplicate negative would count twice in the loss")
        return positions

    def make_batch(self, task: str, example_ids: numpy.ndarray, epoch: int = 0,
                   step: int = 0) -> ContrastiveBatch:
        """The batch of these examples (all of `task`)."""
        queries, positives, languages, scores = [], [], [], []
        negative_pools, prompt_lengths = [], []
        spec = BY_NAME[task]
        max_positive = self.max_query_length if spec.symmetric else self.max_passage_length
        for example_id in example_ids:
            example = self.store.example(int(example_id))
            queries.append(self._finish(example.anchor, self.max_query_length))
            positives.append(self._finish(example.positive, max_positive))
            languages.append(example.language)
            scores.append(example.score)
            negative_pools.append(example.negatives + example.candidates)
            prompt_lengths.append(example.prompt_length)
        query_ids, query_lengths = pad_sequences(queries, self.pad_id)
        positive_ids, positive_lengths = pad_sequences(positives, self.pad_id)
        query_prompt_lengths = torch.tensor(prompt_lengths, dtype=torch.int64)
        batch = ContrastiveBatch(task, torch.as_tensor(numpy.asarray(example_ids, dtype=numpy.int64)),
                                 query_ids, query_lengths, positive_ids, positive_lengths,
                                 query_prompt_lengths=query_prompt_lengths,
                                 positive_prompt_lengths=(query_prompt_lengths.clone() if spec.symmetric
                                                          else torch.zeros_like(query_prompt_lengths)),
                                 languages=languages, epoch=epoch, step=step)
        if spec.score_field:
            batch.scores = torch.tensor(scores, dtype=torch.float32)
        if spec.negatives in (NEGATIVES_MINED, NEGATIVES_LABELS):
            self._add_negatives(batch, task, example_ids, negative_pools)
        return batch

    def _add_negatives(self, batch: ContrastiveBatch, task: str, example_ids,
                       pools: List[List[numpy.ndarray]]) -> None:
        if BY_NAME[task].negatives == NEGATIVES_LABELS:
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
                    sequences.append([self.eod_id])  # padding slot, masked out (never a duplicate)
        batch.negative_ids, batch.negative_lengths = pad_sequences(sequences, self.pad_id)
        batch.negative_mask = positions >= 0
        batch.negative_pool_positions = positions

    def __iter__(self) -> Iterator[ContrastiveBatch]:
        """Batches from the current position on, without end. The position advances before a
        batch is yielded, so state_dict() always names the next batch."""
        while True:
            task, epoch, step, global_ids = self._advance()
            prepare = getattr(self.negative_picker, "prepare", None)
            if prepare is not None and BY_NAME[task].negatives == NEGATIVES_MINED and self.num_negatives > 0:
                prepare(global_ids)  # every rank, the same global batch: collectives line up
            yield self.make_batch(task, self.rank_slice(global_ids), epoch, step)

    # -- resume --
    def state_dict(self) -> Dict[str, object]:
        """The position of the next batch (the step and each task's epoch and cursor), plus what
        the sequence of global batches depends on (checked on load)."""
        return {"version": LOADER_STATE_VERSION, "step": self.step, "seed": self.seed,
                "tasks": {task: {"epoch": epoch, "cursor": cursor}
                          for task, (epoch, cursor) in self._positions.items()},
                "num_examples": len(self.store), "drop_last": self.drop_last,
                "dropped_examples": self.dropped_examples,
                "global_batch_sizes": {task: self._global_batch(task) for task in self.tasks},
                "task_probabilities": dict(self.task_probabilities)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Continue from `state`; the DP size may differ if the global batch sizes are equal."""
        if state.get("version") != LOADER_STATE_VERSION:
            raise CheckpointMismatchError(
                "cannot resume the contrastive loader: its state was written by an older loader "
                "(epoch-plan format); start the data position afresh")
        mine = self.state_dict()
        for key in ("seed", "num_examples", "drop_last", "global_batch_sizes"):
            if state.get(key) != mine[key]:
                raise CheckpointMismatchError(
                    f"cannot resume the contrastive loader: {key} was {state.get(key)}, now "
                    f"{mine[key]} (the sequence of global batches depends on it)")
        saved = state.get("task_probabilities") or {}
        if set(saved) != set(self.task_probabilities) or any(
                not math.isclose(saved[task], self.task_probabilities[task], rel_tol=1e-9)
                for task in saved):
            raise CheckpointMismatchError(
                f"cannot resume the contrastive loader: task probabilities were {saved}, now "
                f"{self.task_probabilities} (the task sequence depends on them)")
        self.step = int(state["step"])
        self.dropped_examples = int(state.get("dropped_examples", 0))  # absent before it was counted
        self._positions = {task: [int(position["epoch"]), int(position["cursor"])]
                           for task, position in state["tasks"].items()}
