"""Which global batch a contrastive loader yields at each step: the task drawn, and its examples.

The task of step s is drawn from (seed, s) alone (`_TaskDraw`), so every rank and every DP size
draws the same sequence and a resumed run continues it. Each task walks its own per-epoch
permutation (seed, task epoch, task) with a cursor; a step takes the next global batch of its
task. The position (the step, each task's epoch and cursor) is `state_dict()`; no tokens are read
here (`contrastive_batches.py` turns a planned batch into tensors).
"""

import math
from typing import Dict, List, Mapping, NamedTuple, Tuple

import numpy

from megatron_conan.data.contrastive_format import TASK_CODES
from megatron_conan.errors import CheckpointMismatchError

LOADER_STATE_VERSION = 2
"""Version 2: a step counter and each task's (epoch, cursor) (version 1 had one epoch plan)."""


class PlannedBatch(NamedTuple):
    """One global batch of the plan."""

    task: str
    epoch: int
    """The task's epoch (pass over its examples) the batch is drawn from."""
    step: int
    """The loader step (global batch number, counted over all tasks)."""
    global_ids: numpy.ndarray
    """[G] int64: the example ids of the whole global batch, every rank's slice in rank order."""


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


class GlobalBatchPlan:
    """The sequence of global batches over `task_ids` (each task's example ids), with
    `global_batch_sizes` per task and draw `probabilities`; the last global batch of a task epoch
    is partial unless `drop_last` skips it. `num_examples` (the store's) is checked on resume."""

    def __init__(self, task_ids: Mapping[str, numpy.ndarray], global_batch_sizes: Mapping[str, int],
                 probabilities: Mapping[str, float], seed: int, drop_last: bool, num_examples: int):
        self.task_ids, self.global_batch_sizes = dict(task_ids), dict(global_batch_sizes)
        self.probabilities = dict(probabilities)
        self.seed, self.drop_last, self.num_examples = seed, drop_last, num_examples
        self._draw = _TaskDraw(self.probabilities, seed)
        self.step = 0
        self.dropped_examples = 0
        """Examples skipped so far as the partial last global batch of a task epoch (drop_last)."""
        self._positions: Dict[str, List[int]] = {task: [0, 0] for task in self.probabilities}
        self._orders: Dict[str, Tuple[int, numpy.ndarray]] = {}

    def batches_per_epoch(self, task: str) -> int:
        """Global batches in one pass over the task's examples."""
        count, size = len(self.task_ids[task]), self.global_batch_sizes[task]
        return count // size if self.drop_last else -(-count // size)

    def _order(self, task: str, epoch: int) -> numpy.ndarray:
        cached = self._orders.get(task)
        if cached is None or cached[0] != epoch:
            rng = numpy.random.default_rng([self.seed, epoch, 1 + TASK_CODES[task]])
            cached = (epoch, rng.permutation(self.task_ids[task]))
            self._orders[task] = cached
        return cached[1]

    def next(self) -> PlannedBatch:
        """The next global batch; the position moves past it."""
        step = self.step
        task = self._draw(step)
        epoch, cursor = self._positions[task]
        order = self._order(task, epoch)
        size = self.global_batch_sizes[task]
        global_ids = order[cursor:cursor + size].astype(numpy.int64)  # the order may be int32
        cursor += len(global_ids)
        if cursor >= len(order) or (self.drop_last and cursor + size > len(order)):
            self.dropped_examples += len(order) - cursor  # the skipped tail of the epoch
            self._positions[task] = [epoch + 1, 0]
        else:
            self._positions[task] = [epoch, cursor]
        self.step = step + 1
        return PlannedBatch(task, epoch, step, global_ids)

    def state_dict(self) -> Dict[str, object]:
        """The position of the next batch (the step and each task's epoch and cursor), plus what
        the sequence of global batches depends on (checked on load)."""
        return {"version": LOADER_STATE_VERSION, "step": self.step, "seed": self.seed,
                "tasks": {task: {"epoch": epoch, "cursor": cursor}
                          for task, (epoch, cursor) in self._positions.items()},
                "num_examples": self.num_examples, "drop_last": self.drop_last,
                "dropped_examples": self.dropped_examples,
                "global_batch_sizes": dict(self.global_batch_sizes),
                "task_probabilities": dict(self.probabilities)}

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
        if set(saved) != set(self.probabilities) or any(
                not math.isclose(saved[task], self.probabilities[task], rel_tol=1e-9)
                for task in saved):
            raise CheckpointMismatchError(
                f"cannot resume the contrastive loader: task probabilities were {saved}, now "
                f"{self.probabilities} (the task sequence depends on them)")
        self.step = int(state["step"])
        self.dropped_examples = int(state["dropped_examples"])
        self._positions = {task: [int(position["epoch"]), int(position["cursor"])]
                           for task, position in state["tasks"].items()}
