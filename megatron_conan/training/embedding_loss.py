"""The loss of an embedding-stage step, composed explicitly from the task table and the config.

    compose_loss(task, section, gather)   for example, a stage-4 retrieval task with Matryoshka dims
                                          and GradCache chunks:
        GradCache(MatryoshkaLoss(InfoNCELoss(temperature, gather), dims, weights), mini_batch_size, ...)

The innermost loss is the task's (``megatron_conan/tasks.py``: its ``LossSpec``), built by the
builder of its name in :data:`LOSS_BUILDERS` with the embedding section's hyper-parameters and the
gather it collects candidates with; ``embedding.matryoshka_dims`` wraps it in the Matryoshka loss;
``embedding.mini_batch_size`` / ``mini_batch_tokens`` decide the outermost wrapper, GradCache or the
plain step (``training/contrastive_step.py``). A new loss is a class in ``losses/`` and a builder here.

:func:`loss_keys` gives the content keys the loss reads from a batch (with its mask and scores,
the stage hands them over as `LossTargets`).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, Optional, Union

import torch

from megatron_conan.config.run import EmbeddingSection
from megatron_conan.losses.cosent import CoSENTLoss
from megatron_conan.losses.gather import Gather
from megatron_conan.losses.infonce import InfoNCELoss
from megatron_conan.losses.matryoshka import MatryoshkaLoss
from megatron_conan.losses.targets import EmbeddingLoss
from megatron_conan.tasks import LossSpec, Task
from megatron_conan.training.contrastive_step import FullBatch, GradCache


def _infonce(spec: LossSpec, section: EmbeddingSection, gather: Optional[Gather]) -> InfoNCELoss:
    return InfoNCELoss(temperature=section.temperature, gather=gather, in_batch_negatives=spec.in_batch_negatives,
                       symmetric=spec.symmetric and section.symmetric)


def _cosent(spec: LossSpec, section: EmbeddingSection, gather: Optional[Gather]) -> CoSENTLoss:
    return CoSENTLoss(scale=section.cosent_scale)


LOSS_BUILDERS: Dict[str, Callable[[LossSpec, EmbeddingSection, Optional[Gather]], EmbeddingLoss]] = {
    "infonce": _infonce,
    "cosent": _cosent,
}
"""LossSpec.name -> the builder of that loss from the embedding section."""


def compose_loss(task: Task, section: EmbeddingSection, gather: Optional[Gather]) -> Union[FullBatch, GradCache]:
    """`task`'s step loss: its loss, over the Matryoshka dims if any, run plain or with GradCache."""
    loss = LOSS_BUILDERS[task.loss.name](task.loss, section, gather)
    if section.matryoshka_dims:
        weights = {int(dim): float(weight) for dim, weight in section.matryoshka_weights.items()}
        loss = MatryoshkaLoss(loss, section.matryoshka_dims, weights or None)
    if section.mini_batch_size > 0 or section.mini_batch_tokens > 0:
        return GradCache(loss, section.mini_batch_size, section.mini_batch_tokens)
    return FullBatch(loss)


def content_keys(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """int64 [n]: a key per sequence, equal for equal token ids (the same on every rank and run)."""
    keys = []
    for row, length in zip(ids.tolist(), lengths.tolist()):
        digest = hashlib.blake2b(repr(row[:length]).encode(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(keys, dtype=torch.int64)


def loss_keys(task: Task, batch, section: EmbeddingSection) -> Dict[str, torch.Tensor]:
    """The content keys `task`'s loss reads from a (CPU) ContrastiveBatch: an in-batch InfoNCE with
    ``embedding.mask_duplicate_positives`` keys its positives, its hard negatives if the batch has
    them, and, when it runs symmetric, its queries; any other loss reads none."""
    spec = task.loss
    if spec.name != "infonce" or not spec.in_batch_negatives or not section.mask_duplicate_positives:
        return {}
    keys = {"positive_keys": content_keys(batch.positive_ids, batch.positive_lengths)}
    if batch.negative_ids is not None:
        keys["negative_keys"] = content_keys(batch.negative_ids, batch.negative_lengths).view(
            batch.negative_mask.shape)
    if spec.symmetric and section.symmetric:
        keys["query_keys"] = content_keys(batch.query_ids, batch.query_lengths)
    return keys
