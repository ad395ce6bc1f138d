"""What an embedding loss is called with besides the embeddings: the batch's targets, and the shape
every loss of this package has.

A loss is an object built with its hyper-parameters (and, if it gathers across ranks, its gather):
``loss(embeddings, targets) -> (loss, stats)``, embeddings by role (``queries``, ``positives``,
``hard_negatives`` as [b, k, d]), stats detached. ``with_gather(gather)`` gives the same loss
gathering with another gather (the Matryoshka wrapper shares one gather over its truncations).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Protocol, Tuple

import torch

from megatron_conan.losses.gather import Gather

Embeddings = Mapping[str, torch.Tensor]
Stats = Dict[str, torch.Tensor]


@dataclasses.dataclass
class LossTargets:
    """Per-batch inputs of a loss other than the embeddings (None: the batch has none)."""

    negative_mask: Optional[torch.Tensor] = None
    """[b, k] bool: False marks a padding slot of the hard negatives (never scored)."""
    positive_keys: Optional[torch.Tensor] = None
    """[b] int64 content keys of the positives (equal texts, equal keys): each text counts once."""
    negative_keys: Optional[torch.Tensor] = None
    """[b, k] int64 content keys of the hard negatives."""
    query_keys: Optional[torch.Tensor] = None
    """[b] int64 content keys of the queries (the symmetric InfoNCE's passage -> query direction)."""
    scores: Optional[torch.Tensor] = None
    """[b] gold scores (CoSENT)."""


class EmbeddingLoss(Protocol):
    """The shape of every loss here (module docstring)."""

    gather: Optional[Gather]

    def with_gather(self, gather: Optional[Gather]) -> "EmbeddingLoss":
        """This loss gathering with `gather`."""

    def __call__(self, embeddings: Embeddings, targets: LossTargets) -> Tuple[torch.Tensor, Stats]:
        """(the loss to back-propagate, detached statistics)."""
