"""Contrastive batches: the tensors of one data-parallel rank's slice of a planned global batch.

`BatchBuilder.make_batch` reads the examples' token ids from the store, truncates them (EOD last
with `append_eod`) and right-pads them; `add_negatives` fills the hard-negative slots from each
example's pool (negatives, then candidates) with the pool positions a picker chooses. A loader
that leaves mined negatives to the step (DHNM: the slot positions live on their owner ranks and
need a collective first) yields batches with `negatives_pending` set, and the step calls
`add_negatives` once the positions are known.
"""

import dataclasses
from typing import Callable, List, Optional, Sequence

import numpy
import torch

from megatron_conan.tasks import BY_NAME, NEGATIVES_LABELS, NEGATIVES_MINED


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
    global_example_ids: Optional[torch.Tensor] = None
    """[G] int64: the whole global batch, every rank's slice in rank order (equal on every rank)."""
    negatives_pending: bool = False
    """True: a mined-negative batch whose slots the step fills (`BatchBuilder.add_negatives`)."""
    dropped_examples: int = 0
    """The loader's count of examples skipped as partial last global batches (drop_last), once
    this batch was drawn (read ahead by a thread, the loader's own count may be further on)."""

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
distinct. A picker is a local lookup: one whose state is sharded over ranks (DHNM) is filled by
its own collective before the step asks it (`DHNMState.exchange`)."""


@dataclasses.dataclass
class BatchBuilder:
    """Tensors of a store's examples, with the loader's lengths, pad / EOD ids and K."""

    store: "ContrastiveStore"  # noqa: F821 - data/contrastive.py's reader (it builds this class)
    pad_id: int
    eod_id: int
    max_query_length: int
    max_passage_length: int
    num_negatives: int
    append_eod: bool = True

    def _finish(self, ids: Sequence[int], max_length: int) -> List[int]:
        ids = [int(token) for token in ids]
        if self.append_eod:
            return ids[:max_length - 1] + [self.eod_id]
        return ids[:max_length]

    def make_batch(self, task: str, example_ids: numpy.ndarray, epoch: int = 0, step: int = 0,
                   picker: Optional[NegativePicker] = None, negatives: bool = True) -> ContrastiveBatch:
        """The batch of these examples (all of `task`); `negatives=False` leaves mined negatives
        pending (labels are always filled: they are the example's own)."""
        queries, positives, languages, scores, prompt_lengths = [], [], [], [], []
        spec = BY_NAME[task]
        max_positive = self.max_query_length if spec.symmetric else self.max_passage_length
        for example_id in example_ids:
            example = self.store.example(int(example_id))
            queries.append(self._finish(example.anchor, self.max_query_length))
            positives.append(self._finish(example.positive, max_positive))
            languages.append(example.language)
            scores.append(example.score)
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
        if spec.negatives == NEGATIVES_LABELS or (spec.negatives == NEGATIVES_MINED and negatives):
            self.add_negatives(batch, picker)
        elif spec.negatives == NEGATIVES_MINED:
            batch.negatives_pending = True
        return batch

    def _pick(self, picker: Optional[NegativePicker], example_id: int, pool_size: int, slots: int) -> List[int]:
        if picker is None:
            return list(range(min(slots, pool_size)))
        positions = [int(position) for position in picker(example_id, pool_size)]
        if any(not 0 <= position < pool_size for position in positions):
            raise ValueError(f"negative_picker gave positions {positions} outside the pool of "
                             f"{pool_size} of example {example_id}")
        positions = positions[:slots]
        if len(set(positions)) != len(positions):
            raise ValueError(f"negative_picker gave duplicate positions {positions} for example "
                             f"{example_id}: a duplicate negative would count twice in the loss")
        return positions

    def add_negatives(self, batch: ContrastiveBatch, picker: Optional[NegativePicker] = None) -> None:
        """Fills the batch's negative slots: every negative label (classification), else K slots
        from the pool positions `picker` gives (None: the first K), missing ones masked."""
        example_ids = batch.example_ids.tolist()
        sizes = [self.store.pool_size(example_id) for example_id in example_ids]
        if BY_NAME[batch.task].negatives == NEGATIVES_LABELS:
            slots = max(sizes, default=0)  # every negative label is used; the pool is only those
            chosen = [list(range(size)) for size in sizes]
        else:
            slots = self.num_negatives
            chosen = [self._pick(picker, example_id, size, slots) for example_id, size in zip(example_ids, sizes)]
        sequences, positions = [], torch.full((len(example_ids), slots), -1, dtype=torch.int64)
        for row, (example_id, picked) in enumerate(zip(example_ids, chosen)):
            pool = self.store.pool_sequence_ids(example_id)
            for slot in range(slots):
                if slot < len(picked):
                    positions[row, slot] = picked[slot]
                    sequences.append(self._finish(self.store.sequence(pool[picked[slot]]), self.max_passage_length))
                else:
                    sequences.append([self.eod_id])  # padding slot, masked out (never a duplicate)
        batch.negative_ids, batch.negative_lengths = pad_sequences(sequences, self.pad_id)
        batch.negative_mask = positions >= 0
        batch.negative_pool_positions = positions
        batch.negatives_pending = False
