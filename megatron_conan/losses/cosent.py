"""CoSENT loss for STS pairs (Su Jianlin's ranking loss over cosine similarities).

With c_i = cos(emb1_i, emb2_i) and gold scores g_i::

    loss = log(1 + sum_{(i, j): g_i > g_j} exp(scale * (c_j - c_i)))

i.e. every pair the gold ranks i above j is penalised by how far the model ranks j above i. It is
computed as a logsumexp over the pair terms plus a zero term (the "1 +"), so large scales do not
overflow. The pairs are those of the local batch: under data parallelism each rank's loss covers its
own pairs and DDP averages the ranks' gradients (no gather; a batch of B gives B(B-1)/2 pairs).
:class:`CoSENTLoss` is the loss object (built with its scale, called on embeddings and targets);
``cosent_loss`` its maths on plain tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_conan.losses.gather import Gather
from megatron_conan.losses.targets import LossTargets


def cosent_from_similarities(similarities: torch.Tensor, scores: torch.Tensor,
                             scale: float = 20.0) -> torch.Tensor:
    """CoSENT over precomputed similarities [b] and gold scores [b]; 0 when no pair is ordered."""
    if similarities.dim() != 1 or scores.shape != similarities.shape:
        raise ValueError(f"similarities and scores must both be [b], got "
                         f"{tuple(similarities.shape)} and {tuple(scores.shape)}")
    # entry (i, j): scale * (c_j - c_i), kept where gold ranks i above j
    differences = scale * (similarities[None, :] - similarities[:, None])  # [b, b]
    ordered = scores[:, None] > scores[None, :]  # [b, b]
    terms = differences.masked_fill(~ordered, float("-inf")).flatten()  # [b*b]
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


def cosent_loss(emb1: torch.Tensor, emb2: torch.Tensor, scores: torch.Tensor,
                scale: float = 20.0) -> torch.Tensor:
    """CoSENT loss of the pairs (emb1_i [b, d], emb2_i [b, d]) with gold `scores` [b].

    The embeddings need not be normalised (cosines are taken here); computed in at least float32.
    """
    if emb1.dim() != 2 or emb2.shape != emb1.shape:
        raise ValueError(f"emb1 and emb2 must both be [b, d], got {tuple(emb1.shape)} and "
                         f"{tuple(emb2.shape)}")
    compute_dtype = torch.promote_types(emb1.dtype, torch.float32)
    emb1, emb2 = emb1.to(compute_dtype), emb2.to(compute_dtype)
    similarities = F.cosine_similarity(emb1, emb2, dim=-1)  # [b]
    return cosent_from_similarities(similarities, scores.to(similarities.device), scale)


@dataclasses.dataclass(frozen=True)
class CoSENTLoss:
    """CoSENT of the pairs (``queries`` [b, d], ``positives`` [b, d]) with gold ``targets.scores`` [b];
    stats: ``num_anchors`` (the pairs). Gathers nothing."""

    scale: float = 20.0
    gather: Optional[Gather] = None
    """Unused: the pairs are each rank's own."""

    def with_gather(self, gather: Optional[Gather]) -> "CoSENTLoss":
        return self

    def __call__(self, embeddings: Mapping[str, torch.Tensor], targets: LossTargets
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        queries = embeddings["queries"]
        loss = cosent_loss(queries, embeddings["positives"], targets.scores, scale=self.scale)
        return loss, {"num_anchors": torch.tensor(len(queries))}
