"""Dynamic hard-negative mining (DHNM, docs/DESIGN.md section 6, the paper's eq. 6): which candidate of
each example's ranked pool fills each hard-negative slot, and when to move on.

Per example e and slot j: the pool position in use and S_0, its score cos(q, n) when first used;
per example: a cursor to the next unused pool position (the initial slots take positions
0..K-1). At every loss computation the scores S_i that the loss already computed are observed and
slot j is replaced when

    S_0 < 0.4    or    (1.2 * S_i < S_0  and  S_i < 0.7)          (thresholds: `DHNMConfig`)

by the next unused candidate of the example's pool, which the loader uses the next time the
example is drawn (its S_0 is recorded then). A pool with no candidate left keeps the candidate it
has, and counts as exhausted. Decisions are computed in float32, the precision of the scores:
the thresholds are rounded to float32 (S_0 == float32(0.4) is not below 0.4).

Ownership: the state of example e lives on data-parallel rank `e % dp_size` (memory is split over
the DP group). A step needs two tiny collectives over that group:

- `exchange(global_example_ids)` (the embed-sup step calls it on every rank with the whole global
  batch, `ContrastiveBatch.global_example_ids`, before it fills the batch's hard-negative slots):
  the owners contribute the slot positions of their examples, one all-reduce gives every rank all
  of them, and the step then calls the state as its picker, `state(example_id, pool_size)`, for
  each example of its slice (`BatchBuilder.add_negatives`).
- `observe(example_ids, positions, scores, mask)` after the loss, with the rank's own batch:
  an all-gather of the observations, then each owner applies eq. 6 to its examples; one
  all-reduce sums the activity counts, so every rank returns the same `DHNMStepStats`.

A step must be observed before the next one is exchanged: a replacement is used the next time the
example is drawn, and that may be the next step. So the loader never picks DHNM's negatives (it
may build batches ahead of the step, `data/prefetch.py`): it leaves them pending, and the step
exchanges and fills them, in order with its own observe. The collectives are `DPGroup`'s.

Checkpoints: `state_dict()` / `load_state_dict()` are this rank's shard (same layout only);
`save(directory)` writes `directory/dhnm/shard_<rank>_of_<dp_size>.npz` (format in
data/README.md), and `load(directory)` reads every shard and keeps the rows this rank owns, so a
checkpoint resumes under another DP size (the files are `data/dhnm_files.py`'s).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_conan.config.run import DHNMConfig
from megatron_conan.data import dhnm_files
from megatron_conan.distributed.device import Placement, current_placement
from megatron_conan.errors import CheckpointMismatchError, ConfigError

STATE_FORMAT = "megatron_conan.dhnm"
STATE_VERSION = 1


@dataclasses.dataclass
class DHNMStepStats:
    """Activity of one observed step, over the whole global batch (equal on every rank)."""

    replacements: int
    """Slots given a new candidate this step."""
    exhausted_now: int
    """Slots that wanted a new candidate but whose pool had none left."""
    scored_slots: int
    """Valid (unmasked) hard-negative slots observed."""
    mean_score: float
    """Mean S_i over the valid slots (NaN when there were none)."""
    exhausted_share: float
    """Examples whose pool is exhausted, over the examples seen so far (0 before any)."""

    def metrics(self) -> Dict[str, float]:
        """Loggable names (the loop's metrics)."""
        values = {"dhnm_replacements": float(self.replacements),
                  "dhnm_exhausted_now": float(self.exhausted_now),
                  "dhnm_scored_slots": float(self.scored_slots),
                  "dhnm_exhausted_share": self.exhausted_share}
        if self.scored_slots:
            values["dhnm_mean_score"] = self.mean_score
        return values


def _as_numpy(value, dtype) -> numpy.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    return numpy.asarray(value, dtype=dtype)


class DPGroup:
    """The collectives of the DHNM state over the data-parallel group (none with one rank):
    `group` None is the default group; `placement` where the tensors live (default: the current
    process group's, i.e. CUDA under NCCL and CPU under gloo)."""

    def __init__(self, size: int, group: Optional[ProcessGroup] = None, placement: Optional[Placement] = None):
        self.size, self.group, self._placement = size, group, placement

    def placement(self) -> Placement:
        return self._placement or current_placement()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self.placement().all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's [b_r, w] rows, concatenated in rank order -> [sum b_r, w]."""
        if self.size == 1:
            return rows
        placement = self.placement()
        sizes = [placement.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        placement.all_gather(sizes, placement.tensor([rows.shape[0]], dtype=torch.int64),
                             group=self.group)
        counts = [int(size.item()) for size in sizes]
        padded = placement.zeros(max(max(counts), 1), rows.shape[1], dtype=rows.dtype)
        padded[:rows.shape[0]] = rows
        pieces = [torch.empty_like(padded) for _ in counts]
        placement.all_gather(pieces, padded, group=self.group)
        return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])


class DHNMState:
    """This DP rank's share of the DHNM state; also the loader's negative picker (module doc).

    `pool_sizes`: [num_examples] pool size (negatives + candidates) of every example of the store
    (`ContrastiveStore.pool_sizes()`; 0 for examples without DHNM). `num_negatives`: K, the
    hard-negative slots per query (the loader's; the paper uses 7). `config`: the thresholds
    (default: the paper's). `group`: the data-parallel
    process group (None: the default group when torch.distributed is initialised and dp_size > 1).
    `placement`: where the collectives' tensors live (a `Placement`, or a torch.device; default:
    the current process group's, i.e. CUDA under NCCL and CPU under gloo).
    """

    def __init__(self, pool_sizes: Sequence[int], num_negatives: int, config: Optional[DHNMConfig] = None,
                 dp_rank: int = 0, dp_size: int = 1, group=None,
                 placement: Union[Placement, torch.device, str, None] = None):
        if num_negatives < 1:
            raise ConfigError(f"DHNM needs hard-negative slots: num_negatives must be >= 1, got {num_negatives}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.num_negatives = int(num_negatives)
        self.config = config or DHNMConfig()
        self.dp_rank, self.dp_size = dp_rank, dp_size
        if placement is not None and not isinstance(placement, Placement):
            placement = Placement(torch.device(placement))
        self.collectives = DPGroup(dp_size, group, placement)
        pool_sizes = numpy.asarray(pool_sizes, dtype=numpy.int64)
        self.num_examples = int(len(pool_sizes))
        self._pool = pool_sizes[dp_rank::dp_size].copy()  # [n] rows this rank owns: e // dp_size
        self._low = numpy.float32(self.config.min_first_score)
        self._ratio = numpy.float32(self.config.drop_ratio)
        self._high = numpy.float32(self.config.max_score)
        self._prepared: Dict[int, numpy.ndarray] = {}
        self.reset()

    # -- the state --
    def reset(self) -> None:
        """Every owned example back to its initial slots (positions 0..K-1, no S_0)."""
        k, rows = self.num_negatives, len(self._pool)
        slots = numpy.arange(k, dtype=numpy.int64)
        self.positions = numpy.where(slots[None, :] < self._pool[:, None], slots[None, :],
                                     -1).astype(numpy.int32)  # [n, K], -1: no candidate
        self.first_scores = numpy.full((rows, k), numpy.nan, dtype=numpy.float32)  # [n, K] S_0
        self.cursor = numpy.minimum(self._pool, k).astype(numpy.int64)  # [n] next unused position
        self.seen = numpy.zeros(rows, dtype=bool)
        self.exhausted = numpy.zeros(rows, dtype=bool)

    def owns(self, example_id: int) -> bool:
        return example_id % self.dp_size == self.dp_rank

    def _rows(self, example_ids: numpy.ndarray) -> numpy.ndarray:
        if len(example_ids) and (example_ids.min() < 0 or example_ids.max() >= self.num_examples):
            raise ValueError(f"example ids outside [0, {self.num_examples})")
        return example_ids // self.dp_size

    def placement(self) -> Placement:
        return self.collectives.placement()

    # -- the step's picker --
    def exchange(self, global_example_ids) -> None:
        """Fetches the slot positions of a whole global batch from their owners (collective: all
        ranks, the same ids, after the observe of the previous step)."""
        ids = _as_numpy(global_example_ids, numpy.int64)  # [G]
        table = self.placement().zeros(len(ids), self.num_negatives, dtype=torch.int64)  # [G, K]
        mine = numpy.flatnonzero(ids % self.dp_size == self.dp_rank)
        if len(mine):
            table[torch.as_tensor(mine)] = torch.as_tensor(
                self.positions[self._rows(ids[mine])], dtype=torch.int64).to(table.device)
        positions = self.collectives.all_reduce(table).cpu().numpy()  # the owners' rows, zeros elsewhere
        self._prepared = dict(zip(ids.tolist(), positions))

    def __call__(self, example_id: int, pool_size: int) -> list:
        """The pool positions of the example's slots (after `exchange`; a single process may skip
        it)."""
        example_id = int(example_id)
        positions = self._prepared.get(example_id)
        if positions is None:
            if self.dp_size > 1:
                raise RuntimeError(f"DHNM: example {example_id} is not in the exchanged global "
                                   f"batch (the step calls exchange() before it fills the negatives)")
            positions = self.positions[self._rows(numpy.array([example_id]))[0]]
        return [int(position) for position in positions if position >= 0]

    # -- observing --
    def observe(self, example_ids, positions, scores, mask) -> DHNMStepStats:
        """Applies eq. 6 to the scores of this rank's batch (every rank calls it, with its own
        batch, possibly empty): `example_ids` [b], `positions` [b, K] (the batch's
        negative_pool_positions), `scores` [b, K] S_i = cos(q, n) (infonce_loss's
        hard_negative_cosines), `mask` [b, K] bool (False: padding, ignored)."""
        k = self.num_negatives
        ids = _as_numpy(example_ids, numpy.int64).reshape(-1)
        local = numpy.zeros((len(ids), 1 + 3 * k), dtype=numpy.float64)  # [b, 1 + 3K]
        local[:, 0] = ids
        local[:, 1:1 + k] = _as_numpy(positions, numpy.int64).reshape(len(ids), k)
        local[:, 1 + k:1 + 2 * k] = _as_numpy(scores, numpy.float32).reshape(len(ids), k)
        local[:, 1 + 2 * k:] = _as_numpy(mask, bool).reshape(len(ids), k)
        rows = self.collectives.all_gather_rows(self.placement().tensor(local, dtype=torch.float64))
        gathered = rows.cpu().numpy()  # [N, 1 + 3K], float64 holds every field exactly
        all_ids = gathered[:, 0].astype(numpy.int64)
        all_positions = gathered[:, 1:1 + k].astype(numpy.int64)
        all_scores = gathered[:, 1 + k:1 + 2 * k].astype(numpy.float32)
        all_mask = gathered[:, 1 + 2 * k:] > 0.5
        if len(numpy.unique(all_ids)) != len(all_ids):
            raise ValueError("DHNM.observe: an example appears twice in one global batch")
        if (all_mask & (all_positions < 0)).any():
            raise ValueError("DHNM.observe: a valid slot has no pool position (-1)")
        mine = all_ids % self.dp_size == self.dp_rank
        replaced, exhausted_now = self._apply(all_ids[mine], all_positions[mine],
                                              all_scores[mine], all_mask[mine])
        counts = torch.tensor([replaced, exhausted_now, int(self.seen.sum()),
                               int(self.exhausted.sum())], dtype=torch.int64)
        counts = self.collectives.all_reduce(self.placement().to_device(counts)).cpu().tolist()
        valid = all_scores[all_mask]
        return DHNMStepStats(
            replacements=counts[0], exhausted_now=counts[1], scored_slots=int(valid.size),
            mean_score=float(valid.astype(numpy.float64).mean()) if valid.size else math.nan,
            exhausted_share=counts[3] / counts[2] if counts[2] else 0.0)

    def _apply(self, ids: numpy.ndarray, positions: numpy.ndarray, scores: numpy.ndarray,
               mask: numpy.ndarray):
        """Eq. 6 on this rank's examples; returns (replacements, exhausted events)."""
        keep = mask.any(axis=1)  # an example with only masked slots leaves the state untouched
        ids, positions, scores, mask = ids[keep], positions[keep], scores[keep], mask[keep]
        rows = self._rows(ids)
        in_use = self.positions[rows]  # [m, K]
        if (mask & (in_use != positions)).any():
            example = int(ids[(mask & (in_use != positions)).any(axis=1)][0])
            raise RuntimeError(f"DHNM.observe: the batch's pool positions of example {example} "
                               f"are not the ones in use (was the batch built before the last "
                               f"observe?)")
        first = self.first_scores[rows]  # [m, K]
        first = numpy.where(mask & numpy.isnan(first), scores, first)  # S_0 at first use
        with numpy.errstate(invalid="ignore"):
            replace = mask & ((first < self._low)
                              | ((self._ratio * scores < first) & (scores < self._high)))
        self.first_scores[rows] = first
        self.seen[rows] = True
        replaced = exhausted_now = 0
        for slot in range(self.num_negatives):  # slot order: a fixed, rank-independent sequence
            wanted = rows[replace[:, slot]]
            available = self.cursor[wanted] < self._pool[wanted]
            moving, stuck = wanted[available], wanted[~available]
            self.positions[moving, slot] = self.cursor[moving]
            self.first_scores[moving, slot] = numpy.nan
            self.cursor[moving] += 1
            self.exhausted[stuck] = True
            replaced += len(moving)
            exhausted_now += len(stuck)
        return replaced, exhausted_now

    # -- checkpoints --
    def _meta(self) -> Dict[str, object]:
        return {"format": STATE_FORMAT, "version": STATE_VERSION,
                "num_examples": self.num_examples, "num_negatives": self.num_negatives,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "config": dataclasses.asdict(self.config)}

    def state_dict(self) -> Dict[str, object]:
        """This rank's shard: the rows of the examples seen so far (others are initial)."""
        rows = numpy.flatnonzero(self.seen)
        return {"meta": self._meta(),
                "example_ids": rows.astype(numpy.int64) * self.dp_size + self.dp_rank,
                "positions": self.positions[rows].copy(),
                "first_scores": self.first_scores[rows].copy(),
                "cursor": self.cursor[rows].copy(),
                "exhausted": self.exhausted[rows].copy()}

    def _check_meta(self, meta: Mapping[str, object], where: str) -> None:
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise CheckpointMismatchError(f"{where}: not a version-{STATE_VERSION} DHNM state")
        for key, mine in (("num_examples", self.num_examples),
                          ("num_negatives", self.num_negatives)):
            if meta.get(key) != mine:
                raise CheckpointMismatchError(
                    f"{where}: DHNM state of {key}={meta.get(key)}, this run has {mine} (another "
                    f"store or another number of hard negatives)")

    def _load_rows(self, state: Mapping[str, object]) -> None:
        ids = numpy.asarray(state["example_ids"], dtype=numpy.int64)
        mine = ids % self.dp_size == self.dp_rank
        rows = self._rows(ids[mine])
        self.positions[rows] = numpy.asarray(state["positions"])[mine]
        self.first_scores[rows] = numpy.asarray(state["first_scores"])[mine]
        self.cursor[rows] = numpy.asarray(state["cursor"])[mine]
        self.exhausted[rows] = numpy.asarray(state["exhausted"])[mine]
        self.seen[rows] = True

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restores this rank's shard (written by the same rank of the same DP size; use
        `load(directory)` to change the DP size)."""
        meta = state["meta"]
        self._check_meta(meta, "DHNM state_dict")
        if (meta.get("dp_rank"), meta.get("dp_size")) != (self.dp_rank, self.dp_size):
            raise CheckpointMismatchError(
                f"DHNM state_dict of DP rank {meta.get('dp_rank')}/{meta.get('dp_size')} given to "
                f"rank {self.dp_rank}/{self.dp_size}: load the checkpoint's shards with load()")
        self.reset()
        self._load_rows(state)
        self._prepared = {}

    def shard_path(self, directory: str) -> str:
        return dhnm_files.shard_path(directory, self.dp_rank, self.dp_size)

    def save(self, directory: str, writer: bool = True) -> Optional[str]:
        """Writes this rank's shard into `directory/dhnm/` atomically; returns its path.
        `writer=False` on the ranks that hold a copy of a shard another rank writes (TP or PP
        rank > 0 of the same DP index)."""
        if not writer:
            return None
        path = self.shard_path(directory)
        dhnm_files.write_shard(path, self.state_dict())
        return path

    def load(self, directory: str) -> None:
        """Restores the state from every shard in `directory/dhnm/` (written under any DP size),
        keeping the rows this rank owns."""
        self.reset()
        for path, meta, arrays in dhnm_files.read_shards(directory):
            self._check_meta(meta, path)
            self._load_rows(arrays)
        self._prepared = {}
