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
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron_conan.data.contrastive_batches import BatchBuilder, ContrastiveBatch, NegativePicker, pad_sequences
from megatron_conan.data.contrastive_format import EXAMPLES_SUFFIX, STORE_SUFFIXES, check_store_meta, prompt_token_count
from megatron_conan.data.contrastive_plan import LOADER_STATE_VERSION, GlobalBatchPlan
from megatron_conan.data.provenance import META_SUFFIX
from megatron_conan.errors import ConfigError, DataError
from megatron_conan.tasks import BY_NAME, NEGATIVES_MINED, TASK_NAMES, check_instructions, paper_task_weights

__all__ = ["LOADER_STATE_VERSION", "PAPER_TASK_WEIGHTS", "ContrastiveBatch", "ContrastiveExample", "ContrastiveLoader",
           "ContrastiveStore", "NegativePicker", "PoolReport", "pad_sequences", "pool_report"]
"""The batch type, padding and picker live in contrastive_batches.py, the plan in contrastive_plan.py;
they are named here too, as the loader's interface."""

logger = logging.getLogger(__name__)

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
    (negatives, then candidates), missing ones masked; `negative_picker` chooses the pool
    positions per example. With `defer_mined_negatives` (DHNM, whose slot positions live on their
    owner ranks) retrieval/clr batches come with `negatives_pending` and the step fills them
    (`builder.add_negatives`) after its exchange: the loader itself never communicates, so
    batches can be prepared ahead of the step (`data/prefetch.py`).

    The loader is a stateful iterator: `next()` yields the batch its `state_dict()` names and
    moves past it; the plan of global batches is `GlobalBatchPlan` (`contrastive_plan.py`), the
    tensors `BatchBuilder` (`contrastive_batches.py`).
    """

    def __init__(self, path_prefix: str, tokenizer, batch_size: Union[int, Mapping[str, int]],
                 instructions: Optional[Mapping[str, str]] = None, dp_rank: int = 0,
                 dp_world_size: int = 1, seed: int = 1234, max_query_length: int = 512,
                 max_passage_length: int = 512, num_negatives: int = 7,
                 tasks: Optional[Sequence[str]] = None, drop_last: bool = False,
                 append_eod: bool = True, negative_picker: Optional[NegativePicker] = None,
                 task_weights: Union[None, str, Mapping[str, float]] = None,
                 defer_mined_negatives: bool = False):
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
        self.builder = BatchBuilder(self.store, tokenizer.pad_id, tokenizer.eod_id, max_query_length,
                                    max_passage_length, num_negatives, append_eod)
        self.dp_rank, self.dp_world_size, self.seed = dp_rank, dp_world_size, seed
        self.num_negatives, self.drop_last = num_negatives, drop_last
        self.negative_picker = negative_picker
        self.defer_mined_negatives = defer_mined_negatives
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
        self.plan = GlobalBatchPlan(self._task_ids, {task: self._global_batch(task) for task in self.tasks},
                                    self.task_probabilities, seed, drop_last, len(self.store))
        self.pool_report = pool_report(self.store, self.tasks, num_negatives)
        if self.pool_report.empty or self.pool_report.short:
            level = logging.WARNING if self.pool_report.empty else logging.INFO
            logger.log(level, "%s: %s", path_prefix, self.pool_report.format())

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

    def _global_batch(self, task: str) -> int:
        return self.batch_sizes[task] * self.dp_world_size

    def batches_per_epoch(self, task: str) -> int:
        """Global batches in one pass over the task's examples."""
        return self.plan.batches_per_epoch(task)

    @property
    def step(self) -> int:
        """The loader step of the next batch."""
        return self.plan.step

    @property
    def dropped_examples(self) -> int:
        """Examples skipped so far as the partial last global batch of a task epoch (drop_last)."""
        return self.plan.dropped_examples

    def rank_slice(self, global_ids: numpy.ndarray) -> numpy.ndarray:
        """This rank's part of a global batch."""
        return numpy.array_split(global_ids, self.dp_world_size)[self.dp_rank]

    def make_batch(self, task: str, example_ids: numpy.ndarray, epoch: int = 0,
                   step: int = 0) -> ContrastiveBatch:
        """The batch of these examples (all of `task`), negatives filled by `negative_picker`."""
        return self.builder.make_batch(task, example_ids, epoch, step, picker=self.negative_picker)

    def __iter__(self) -> Iterator[ContrastiveBatch]:
        return self

    def __next__(self) -> ContrastiveBatch:
        """This rank's slice of the next global batch, without end. The position moves past it
        before it is returned, so state_dict() always names the next batch."""
        planned = self.plan.next()
        batch = self.builder.make_batch(planned.task, self.rank_slice(planned.global_ids), planned.epoch,
                                        planned.step, picker=self.negative_picker,
                                        negatives=not self.defer_mined_negatives)
        batch.global_example_ids = torch.from_numpy(planned.global_ids)
        batch.dropped_examples = self.plan.dropped_examples
        return batch

    # -- resume --
    def state_dict(self) -> Dict[str, object]:
        """The position of the next batch (`GlobalBatchPlan.state_dict`)."""
        return self.plan.state_dict()

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Continue from `state`; the DP size may differ if the global batch sizes are equal."""
        self.plan.load_state_dict(state)
