"""InfoNCE over embeddings, with candidates gathered across the data-parallel group.

Anchors (queries) stay local; the candidates (every rank's positives, and with hard negatives
every rank's hard negatives) are all-gathered with autograd, and the label of local anchor i is
its positive's row in the gathered candidates, ``offset(rank) + i``. Given content keys, a text
that occurs several times among the candidates counts once in each denominator (``infonce_loss``). With
``in_batch_negatives=False`` (the classification stage: text, positive label, negative labels)
each query is scored against its own positive and its own negatives only, and nothing is gathered.

The loss is an object built with its hyper-parameters and the gather it collects candidates with
(:class:`InfoNCELoss`, called on embeddings by role and the batch's targets); ``infonce_loss`` is its
maths on plain tensors.

Scaling: with N anchors over the k ranks of the group, rank r returns
``(k / N) * sum_{i on r} l_i``, so megatron DDP's 1/k gradient averaging gives the gradient of the
single-process mean over the concatenated batch (gather.py states the contract), and the mean of
the returned losses over the ranks is that global mean. Every rank of the group must call this
(and run backward) with the same arguments' structure: hard negatives present or not, the same K.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_conan.losses.gather import Gather
from megatron_conan.losses.targets import LossTargets


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` holds; 0 when nothing does."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _first_occurrences(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bool [M]: candidate c is valid and no valid candidate before it has its key."""
    if not len(keys):
        return valid.clone()
    unique, inverse = torch.unique(keys, return_inverse=True)
    index = torch.arange(len(keys), device=keys.device)
    never = torch.full_like(index, len(keys))
    first_index = never[:len(unique)].scatter_reduce(0, inverse, torch.where(valid, index, never), "amin")  # [U]
    return valid & (first_index[inverse] == index)


def _duplicate_candidates(candidate_keys: torch.Tensor, candidate_valid: torch.Tensor,
                          anchor_keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [b, M]: the candidates left out of each anchor's denominator (infonce_loss's
    positive_keys): every copy of the anchor's own positive other than its label, and every later copy of
    any other text, so that each text counts once."""
    duplicate = ((candidate_keys[None, :] == anchor_keys[:, None])
                 | ~_first_occurrences(candidate_keys, candidate_valid)[None, :])  # [b, M]
    duplicate[torch.arange(len(labels), device=labels.device), labels] = False
    return duplicate


def _check_arguments(queries, positives, hard_negatives, negative_mask, temperature, in_batch_negatives) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if queries.dim() != 2 or positives.shape != queries.shape:
        raise ValueError(f"queries and positives must both be [b, d], got {tuple(queries.shape)} "
                         f"and {tuple(positives.shape)}")
    if hard_negatives is not None:
        if hard_negatives.dim() != 3 or hard_negatives.shape[0] != queries.shape[0] \
                or hard_negatives.shape[2] != queries.shape[1]:
            raise ValueError(f"hard_negatives must be [b, k, d] = [{queries.shape[0]}, k, "
                             f"{queries.shape[1]}], got {tuple(hard_negatives.shape)}")
    if negative_mask is not None:
        if hard_negatives is None:
            raise ValueError("negative_mask given without hard_negatives")
        if negative_mask.dtype != torch.bool or negative_mask.shape != hard_negatives.shape[:2]:
            raise ValueError(f"negative_mask must be bool [b, k] = "
                             f"{tuple(hard_negatives.shape[:2])}, got {negative_mask.dtype} "
                             f"{tuple(negative_mask.shape)}")
    if not in_batch_negatives and hard_negatives is None:
        raise ValueError("in_batch_negatives=False scores each query against its own negatives: "
                         "hard_negatives are required")


def infonce_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: Optional[torch.Tensor] = None,
    temperature: float = 0.02,
    gather: Optional[Gather] = None,
    in_batch_negatives: bool = True,
    negative_mask: Optional[torch.Tensor] = None,
    positive_keys: Optional[torch.Tensor] = None,
    negative_keys: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """InfoNCE loss of the local anchors and its statistics.

    queries, positives: [b, d]; hard_negatives: [b, k, d] or None; negative_mask: [b, k] bool, False
    for padding slots (never scored). Inputs are L2-normalised here (a no-op for unit vectors; what
    makes Matryoshka prefixes safe); logits are cosines / `temperature`, in at least float32.

    gather: gathers the candidates over the data-parallel group (``GroupGather(dp_group)``); None
    (or one rank) scores the local batch only. Without in-batch negatives it only counts the anchors.

    positive_keys: int64 [b] content keys of the positives (equal texts, equal keys); negative_keys:
    int64 [b, k] of the hard negatives (with positive_keys). With keys each text counts once in
    every denominator (README.md beside this file states the rule: a copy of i's positive elsewhere
    is left out, a hub text is scored once); None: every in-batch candidate counts.

    Returns ``(loss, stats)``, stats detached (README.md lists them), among them DHNM's S_i:
    ``hard_negative_cosines`` [b, k] = cos(query_i, own negative j), padding slots included."""
    _check_arguments(queries, positives, hard_negatives, negative_mask, temperature, in_batch_negatives)
    compute_dtype = torch.promote_types(queries.dtype, torch.float32)

    def normalized(x):
        return F.normalize(x.to(compute_dtype), dim=-1)

    # the gathers take the arguments themselves (then normalise: row-wise, so the same values), so
    # that Matryoshka's SharedGather gathers each tensor once per step, not once per dim
    raw_positives, raw_negatives = positives, hard_negatives
    queries = normalized(queries)  # [b, d]
    positives = normalized(positives)  # [b, d]
    if hard_negatives is not None:
        hard_negatives, negative_mask, own_negative_cosines = _own_negatives(
            queries, normalized(hard_negatives), negative_mask, in_batch_negatives)

    gathering = gather is not None and gather.size > 1
    ranks = gather.size if gathering else 1
    if in_batch_negatives:
        logits, labels, global_anchors = _in_batch_logits(
            queries, positives, raw_positives, hard_negatives, raw_negatives, negative_mask,
            positive_keys, negative_keys, gather if gathering else None, normalized)
    else:
        logits, labels = _own_negative_logits(queries, positives, own_negative_cosines, negative_mask)
        global_anchors = sum(gather.sizes(queries)) if gathering else queries.shape[0]

    per_anchor = F.cross_entropy(logits / temperature, labels, reduction="none")  # [b]
    loss = per_anchor.sum() * (ranks / max(global_anchors, 1))

    stats = _statistics(loss, logits, labels, queries, positives, compute_dtype)
    if hard_negatives is not None:
        stats["hard_negative_cosines"] = own_negative_cosines.detach().clone()
        stats["hard_negative_cosine"] = _masked_mean(own_negative_cosines.detach(), negative_mask)
    return loss, stats


def _own_negatives(queries, hard_negatives, negative_mask, in_batch_negatives):
    """(the normalised hard negatives [b, k, d], their mask [b, k] (all valid when None), and
    cos(query_i, own negative j) [b, k]): the classification variant's loss, so with gradients
    there; statistics only in the in-batch variant."""
    if negative_mask is None:
        negative_mask = torch.ones(hard_negatives.shape[:2], dtype=torch.bool, device=hard_negatives.device)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not in_batch_negatives):
        own_negative_cosines = torch.einsum("bd,bkd->bk", queries, hard_negatives)  # [b, k]
    return hard_negatives, negative_mask, own_negative_cosines


def _own_negative_logits(queries, positives, own_negative_cosines, negative_mask):
    """The classification variant's logits [b, 1 + k] (own positive, own valid negatives) and labels [b]."""
    positive_logits = (queries * positives).sum(-1, keepdim=True)  # [b, 1]
    negative_logits = own_negative_cosines.masked_fill(~negative_mask, float("-inf"))
    logits = torch.cat([positive_logits, negative_logits], dim=1)  # [b, 1 + k]
    return logits, torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device)


def _in_batch_logits(queries, positives, raw_positives, hard_negatives, raw_negatives, negative_mask,
                     positive_keys, negative_keys, gather, normalized):
    """The in-batch variant's logits [b, N (+ N*k)] against the (gathered) positives and hard
    negatives, each text counted once where keys are given; with the labels [b] and the global
    number of anchors. `gather` None: the local batch only."""
    local = queries.shape[0]
    if gather is not None:
        candidates, sizes = gather(raw_positives)  # [N, d]
        candidates = normalized(candidates)
        offset = sum(sizes[:gather.rank])
    else:
        candidates, sizes, offset = positives, [local], 0
    labels = offset + torch.arange(local, device=queries.device)
    logits = queries @ candidates.T  # [b, N]
    candidate_keys = None
    if positive_keys is not None:
        if positive_keys.shape != (local,):
            raise ValueError(f"positive_keys must be [b] = [{local}], got {tuple(positive_keys.shape)}")
        candidate_keys = gather(positive_keys)[0] if gather is not None else positive_keys  # [N]
    candidate_valid = torch.ones(logits.shape[1], dtype=torch.bool, device=queries.device)  # [N]
    if hard_negatives is not None:
        all_negatives, all_mask = hard_negatives, negative_mask
        if gather is not None:
            all_negatives = normalized(gather(raw_negatives)[0])  # [N, k, d]
            all_mask = gather(negative_mask)[0]
        negative_logits = queries @ all_negatives.flatten(0, 1).T  # [b, N*k]
        negative_logits = negative_logits.masked_fill(~all_mask.flatten(), float("-inf"))
        logits = torch.cat([logits, negative_logits], dim=1)  # [b, N + N*k]
        if candidate_keys is not None and negative_keys is not None:
            if negative_keys.shape != negative_mask.shape:
                raise ValueError(f"negative_keys must be [b, k] = {tuple(negative_mask.shape)}, "
                                 f"got {tuple(negative_keys.shape)}")
            all_negative_keys = gather(negative_keys)[0] if gather is not None else negative_keys  # [N, k]
            candidate_keys = torch.cat([candidate_keys, all_negative_keys.flatten()])  # [N + N*k]
            candidate_valid = torch.cat([candidate_valid, all_mask.flatten()])  # [N + N*k]
    if candidate_keys is not None:
        duplicate = _duplicate_candidates(candidate_keys, candidate_valid, positive_keys, labels)  # [b, M]
        unkeyed = logits.shape[1] - duplicate.shape[1]  # hard negatives without keys: each its own text
        duplicate = torch.cat([duplicate, duplicate.new_zeros(local, unkeyed)], dim=1)  # [b, N (+ N*k)]
        logits = logits.masked_fill(duplicate, float("-inf"))
    return logits, labels, sum(sizes)


@torch.no_grad()
def _statistics(loss, logits, labels, queries, positives, compute_dtype) -> Dict[str, torch.Tensor]:
    """Detached loss, accuracy, positive and negative cosine means and the anchor count."""
    local = queries.shape[0]
    anchors = torch.ones(local, dtype=torch.bool, device=queries.device)
    hits = logits.argmax(dim=1) == labels if logits.numel() else anchors
    stats = {
        "loss": loss.detach().clone(),
        "accuracy": _masked_mean(hits.to(compute_dtype), anchors),
        "positive_cosine": _masked_mean((queries * positives).sum(-1), anchors),
        "num_anchors": torch.tensor(local, device=queries.device),
    }
    # mean cosine of the anchors against everything their denominators score but their own
    # positive (in-batch and hard negatives, masked ones left out): with positive_cosine, it
    # tells learning (the gap widens) from collapse (both rise towards 1)
    scored = torch.isfinite(logits)
    scored[torch.arange(local, device=queries.device), labels] = False
    stats["negative_cosine"] = _masked_mean(logits.masked_fill(~scored, 0.0), scored)
    return stats


@dataclasses.dataclass(frozen=True)
class InfoNCELoss:
    """InfoNCE on embeddings by role: ``queries`` [b, d], ``positives`` [b, d] and, if the batch has
    them, ``hard_negatives`` [b, k, d]; the targets give the negative mask and the content keys.
    ``symmetric`` adds the passage -> query direction (each positive against the gathered queries,
    keyed by ``targets.query_keys``) and returns the mean of the two; its statistics are the
    query -> passage direction's."""

    temperature: float = 0.02
    gather: Optional[Gather] = None
    """What the in-batch candidates are gathered with (None: the local batch only)."""
    in_batch_negatives: bool = True
    """False: each query against its own positive and own hard negatives only (classification)."""
    symmetric: bool = False

    def with_gather(self, gather: Optional[Gather]) -> "InfoNCELoss":
        """This loss gathering with `gather` (Matryoshka hands it a SharedGather)."""
        return dataclasses.replace(self, gather=gather)

    def __call__(self, embeddings: Mapping[str, torch.Tensor], targets: LossTargets
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        queries, positives = embeddings["queries"], embeddings["positives"]
        loss, stats = infonce_loss(queries, positives, embeddings.get("hard_negatives"), self.temperature,
                                   self.gather, self.in_batch_negatives, targets.negative_mask,
                                   targets.positive_keys, targets.negative_keys)
        if self.symmetric:
            reverse, _ = infonce_loss(positives, queries, temperature=self.temperature, gather=self.gather,
                                      positive_keys=targets.query_keys)
            loss = (loss + reverse) / 2
        return loss, stats
