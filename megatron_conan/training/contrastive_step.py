"""Forward and backward of one contrastive batch, plain or with GradCache: the two outermost loss
wrappers, which turn a loss over embeddings into a step over token sequences.

The loss of a contrastive batch couples every sequence in it (in-batch negatives are gathered over
the data-parallel group), so it cannot be cut into independent micro-batches the way a language-model
loss is. Two ways to run it:

* :class:`FullBatch` (``embedding.mini_batch_size=0``): embed each role (queries, positives,
  negatives, ...) in one forward with activations kept, compute the loss, back-propagate;
* :class:`GradCache` (Gao et al. 2021; sentence-transformers' ``CachedMultipleNegativesRankingLoss``):
  embed every role in chunks of ``mini_batch_size`` sequences *without* activations, compute the
  loss on the cached embeddings and its gradient with respect to them (the gathers and their
  backward run here, once), then replay each chunk with activations and back-propagate its slice of
  the cached gradient. The RNG state is captured before each chunk's first pass and restored for its
  replay, so dropout (if any) draws the same masks. Peak activation memory is one chunk's; the batch
  is limited by the embeddings only. The parameter gradients equal the plain step's (tested to 1e-6
  in fp32). Each role is cut in length order (`by_length`); the loss sees the batch's own order.

Both wrap an embedding loss (``losses/``: ``loss(embeddings, targets) -> (loss, stats)``) and run
``forward_backward(embedder, roles, targets)``. Roles are embedded separately (a query batch and a
passage batch have different lengths) by a :class:`RoleEmbedder`; each chunk is cut to its own
longest sequence, or packed (``max_tokens_per_row``: texts back to back in rows, no padding between
them, ``models/packing.py``). GradCache chunks hold ``mini_batch_size`` sequences and, with
``mini_batch_tokens``, no more true tokens than that (at least one text). A role with
``per_example`` K reaches the loss as [n / K, K, h] (hard negatives: K per query). Every rank must run
the step once per step with the same roles, because the loss gathers over the DP group; a rank may
hold zero sequences of a role.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy
import torch
from megatron.core import tensor_parallel

from megatron_conan.losses.targets import EmbeddingLoss, LossTargets, Stats
from megatron_conan.models.embedder import embed

Chunks = List[Tuple[int, int]]


@dataclass
class Sequences:
    """Right-padded token ids [n, L] and their true lengths [n], on the model's device; `starts`
    [n] (optional): leading prompt tokens each sequence's pooling leaves out."""

    ids: torch.Tensor
    lengths: torch.Tensor
    starts: Optional[torch.Tensor] = None
    per_example: int = 0
    """K > 0: the sequences are K per example (example-major) and the loss sees [n / K, K, h]."""

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def select(self, index: torch.Tensor) -> "Sequences":
        """The sequences at `index` [m] (long), in that order."""
        starts = None if self.starts is None else self.starts[index]
        return Sequences(self.ids[index], self.lengths[index], starts, self.per_example)

    def rows(self, start: int, stop: int) -> "Sequences":
        """Rows [start, stop), cut to their longest sequence."""
        lengths = self.lengths[start:stop]
        width = max(int(lengths.max()), 1) if len(lengths) else 1
        starts = None if self.starts is None else self.starts[start:stop]
        return Sequences(self.ids[start:stop, :width], lengths, starts, self.per_example)


@dataclass(frozen=True)
class RoleEmbedder:
    """Embeds the sequences of a role: the model without its output layer, pooled over true lengths
    (``models/embedder.py``), right-padded or packed."""

    model: Any
    pooling: str
    width: int
    """Hidden size: the width of a role with no sequence on this rank."""
    max_tokens_per_row: int = 0
    """> 0: packed rows of this many tokens; 0: right-padded."""

    def __call__(self, chunk: Sequences) -> torch.Tensor:
        return embed(self.model, chunk.ids, chunk.lengths, self.pooling, starts=chunk.starts,
                     max_tokens_per_row=self.max_tokens_per_row)  # [c, h]


def _chunks(lengths: torch.Tensor, size: int, tokens: int = 0) -> List[Tuple[int, int]]:
    """[start, stop) chunks of at most `size` sequences (0: no limit) and, with `tokens`, at most that
    many true tokens (a longer sequence alone)."""
    count = int(lengths.shape[0])
    size = size if size > 0 else max(count, 1)
    if tokens <= 0:
        return [(start, min(start + size, count)) for start in range(0, count, size)]
    chunks, start, used = [], 0, 0
    for index, length in enumerate(lengths.tolist()):
        if index > start and (index - start >= size or used + length > tokens):
            chunks.append((start, index))
            start, used = index, 0
        used += length
    if count:
        chunks.append((start, count))
    return chunks


def _capture_rng() -> dict:
    return {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def by_length(sequences: Sequences) -> torch.Tensor:
    """[n] long: the order in which GradCache embeds a role, longest first (ties in batch order).
    Any partition into chunks gives the same gradients; this one gives chunks of texts of like length,
    so a 20-token query is never padded, or packed, beside a 512-token one."""
    return torch.sort(sequences.lengths, descending=True, stable=True).indices


def _embed_role(embedder: RoleEmbedder, sequences: Sequences, chunks: Chunks,
                rng_states: Optional[List[dict]] = None) -> torch.Tensor:
    """Embeddings [n, h] of `sequences`, chunk by chunk (recording each chunk's RNG state if asked)."""
    if len(sequences) == 0:
        # still a leaf of the graph: the loss's gathers run their backward collectives on every rank
        return torch.zeros(0, embedder.width, device=sequences.ids.device, requires_grad=torch.is_grad_enabled())
    pieces = []
    for start, stop in chunks:
        if rng_states is not None:
            rng_states.append(_capture_rng())
        pieces.append(embedder(sequences.rows(start, stop)))  # [c, h]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def as_loss_input(roles: Dict[str, Sequences], embeddings: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The embeddings by role as the loss takes them: a role of K texts per example as [n / K, K, h]."""
    return {role: tensor.view(-1, roles[role].per_example, tensor.shape[-1]) if roles[role].per_example else tensor
            for role, tensor in embeddings.items()}


def _scaled_backward(loss: torch.Tensor, grad_scale: Optional[Callable]) -> None:
    if loss.requires_grad:  # a rank with no sequences and a loss without gathers has nothing to do
        (grad_scale(loss) if grad_scale is not None else loss).backward()


@dataclass(frozen=True)
class FullBatch:
    """The plain step: each role in one forward with activations, then the loss and its backward."""

    loss: EmbeddingLoss

    def forward_backward(self, embedder: RoleEmbedder, roles: Dict[str, Sequences], targets: LossTargets,
                         grad_scale: Optional[Callable] = None) -> Tuple[torch.Tensor, Stats]:
        """Embed `roles`, compute the loss, back-propagate into the model's gradients. Returns the
        (unscaled, detached) loss and the statistics; ``grad_scale`` is the optimizer's loss scaler
        (fp16); gradients are left un-reduced over DP (the caller runs finalize_model_grads)."""
        embeddings = {role: _embed_role(embedder, sequences, _chunks(sequences.lengths, 0))
                      for role, sequences in roles.items()}
        loss, stats = self.loss(as_loss_input(roles, embeddings), targets)
        _scaled_backward(loss, grad_scale)
        return loss.detach(), stats


@dataclass(frozen=True)
class GradCache:
    """GradCache over `loss` (module docstring): chunks of `mini_batch_size` sequences (0: no limit)
    and, with `mini_batch_tokens`, at most that many true tokens."""

    loss: EmbeddingLoss
    mini_batch_size: int = 0
    mini_batch_tokens: int = 0

    def chunks(self, sequences: Sequences) -> Chunks:
        return _chunks(sequences.lengths, self.mini_batch_size, self.mini_batch_tokens)

    def forward_backward(self, embedder: RoleEmbedder, roles: Dict[str, Sequences], targets: LossTargets,
                         grad_scale: Optional[Callable] = None) -> Tuple[torch.Tensor, Stats]:
        """As :meth:`FullBatch.forward_backward`, with the same gradients and one chunk's activations."""
        order = {role: by_length(sequences) for role, sequences in roles.items()}  # sorted position -> batch index
        roles = {role: sequences.select(order[role]) for role, sequences in roles.items()}
        rng_states: Dict[str, List[dict]] = {role: [] for role in roles}
        with torch.no_grad():
            cached = {role: _embed_role(embedder, sequences, self.chunks(sequences), rng_states[role])
                      for role, sequences in roles.items()}
            cached = {role: torch.empty_like(tensor).index_copy_(0, order[role], tensor)  # back in batch order
                      for role, tensor in cached.items()}
        cached = {role: tensor.requires_grad_(True) for role, tensor in cached.items()}
        loss, stats = self.loss(as_loss_input(roles, cached), targets)
        _scaled_backward(loss, grad_scale)  # d(loss)/d(embeddings), through the gathers, for every role at once
        for role, sequences in roles.items():
            gradient = cached[role].grad
            if gradient is None or len(sequences) == 0:
                continue
            gradient = gradient[order[role]]  # sorted order, as the chunks run
            for (start, stop), state in zip(self.chunks(sequences), rng_states[role]):
                _restore_rng(state)
                replayed = embedder(sequences.rows(start, stop))  # [c, h], with activations
                replayed.backward(gradient[start:stop])
        return loss.detach(), stats
