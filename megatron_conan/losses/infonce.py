"""InfoNCE over embeddings, with candidates gathered across the data-parallel group.

Anchors (queries) stay local; the candidates (every rank's positives, and with hard negatives
every rank's hard negatives) are all-gathered with autograd, and the label of local anchor i is
its positive's row in the gathered candidates, ``offset(rank) + i``. Given content keys, a text
that occurs several times among the candidates counts once in each denominator (``infonce_loss``). With
``in_batch_negatives=False`` (the classification stage: text, positive label, negative labels)
each query is scored against its own positive and its own negatives only, and nothing is gathered.

Scaling: with N anchors over the k ranks of the group, rank r returns
``(k / N) * sum_{i on r} l_i``, so megatron DDP's 1/k gradient averaging gives the gradient of the
single-process mean over the concatenated batch (gather.py states the contract), and the mean of
the returned losses over the ranks is that global mean. Every rank of the group must call this
(and run backward) with the same arguments' structure: hard negatives present or not, the same K.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_conan.losses.gather import (all_gather_with_grad, all_gather_with_sizes, gather_sizes,
                                          group_rank, group_size)


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
    gather_group: Optional[dist.ProcessGroup] = None,
    in_batch_negatives: bool = True,
    negative_mask: Optional[torch.Tensor] = None,
    positive_keys: Optional[torch.Tensor] = None,
    negative_keys: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """InfoNCE loss of the local anchors and its statistics.

    queries, positives: [b, d]; hard_negatives: [b, k, d] or None; negative_mask: [b, k] bool,
    False for padding slots (never scored; ContrastiveBatch.negative_mask). The inputs are
    L2-normalised here (a no-op in value and gradient for unit vectors such as ``pool``'s output,
    and what makes truncated Matryoshka prefixes or raw vectors safe). Logits are cosines divided
    by `temperature`, computed in at least float32.

    gather_group: the data-parallel group to gather candidates over; None (or torch.distributed not
    initialised) scores against the local batch only. Ignored for the gather when
    ``in_batch_negatives=False``, but still used to count the global anchors for the scaling.

    positive_keys: int64 [b] content keys of the positives (equal texts, equal keys), gathered with
    them; negative_keys: int64 [b, k] keys of the hard negatives (used with positive_keys). With
    keys, each text counts once in every denominator: for anchor i, candidate c (the gathered
    positives, then the gathered hard negatives; padding slots never count) is kept iff c is i's
    label, or key(c) differs from the key of i's own positive and c is the first valid candidate
    with key(c). So a copy of i's positive elsewhere in the global batch (a false negative) is left
    out, and a hub text (a hard negative of several rows, or a negative that is another row's
    positive) is scored once, not once per copy. None: every in-batch candidate counts (hard
    negatives without negative_keys each count as their own text).

    Returns ``(loss, stats)``; stats are detached: ``loss``, ``accuracy`` (share of local anchors
    whose own positive scores highest), ``positive_cosine`` (mean), ``hard_negative_cosine`` (mean
    over the valid hard negatives of the local anchors; 0 without any), ``hard_negative_cosines``
    ([b, k] cos(query_i, own negative j), padding slots included: mask them with negative_mask;
    the S_i that DHNM reuses) and ``num_anchors``.
    """
    _check_arguments(queries, positives, hard_negatives, negative_mask, temperature, in_batch_negatives)
    compute_dtype = torch.promote_types(queries.dtype, torch.float32)

    def normalized(x):
        return F.normalize(x.to(compute_dtype), dim=-1)

    # the gathers take the arguments themselves (then normalise: row-wise, so the same values), so
    # that Matryoshka's shared_gathers() scope gathers each tensor once per step, not once per dim
    raw_positives, raw_negatives = positives, hard_negatives
    queries = normalized(queries)  # [b, d]
    positives = normalized(positives)  # [b, d]
    local = queries.shape[0]
    if hard_negatives is not None:
        hard_negatives = normalized(hard_negatives)  # [b, k, d]
        if negative_mask is None:
            negative_mask = torch.ones(hard_negatives.shape[:2], dtype=torch.bool, device=hard_negatives.device)
        # the loss of the classification variant; statistics only in the in-batch variant
        with torch.set_grad_enabled(torch.is_grad_enabled() and not in_batch_negatives):
            own_negative_cosines = torch.einsum("bd,bkd->bk", queries, hard_negatives)  # [b, k]

    gathering = gather_group is not None and group_size(gather_group) > 1
    ranks = group_size(gather_group) if gathering else 1
    if in_batch_negatives:
        logits, labels, global_anchors = _in_batch_logits(
            queries, positives, raw_positives, hard_negatives, raw_negatives, negative_mask,
            positive_keys, negative_keys, gather_group if gathering else None, normalized)
    else:
        positive_logits = (queries * positives).sum(-1, keepdim=True)  # [b, 1]
        negative_logits = own_negative_cosines.masked_fill(~negative_mask, float("-inf"))
        logits = torch.cat([positive_logits, negative_logits], dim=1)  # [b, 1 + k]
        labels = torch.zeros(local, dtype=torch.int64, device=queries.device)
        global_anchors = sum(gather_sizes(queries, gather_group)) if gathering else local

    per_anchor = F.cross_entropy(logits / temperature, labels, reduction="none")  # [b]
    loss = per_anchor.sum() * (ranks / max(global_anchors, 1))

    stats = _statistics(loss, logits, labels, queries, positives, compute_dtype)
    if hard_negatives is not None:
        stats["hard_negative_cosines"] = own_negative_cosines.detach().clone()
        stats["hard_negative_cosine"] = _masked_mean(own_negative_cosines.detach(), negative_mask)
    return loss, stats


def _in_batch_logits(queries, positives, raw_positives, hard_negatives, raw_negatives, negative_mask,
                     positive_keys, negative_keys, gather_group, normalized):
    """The in-batch variant's logits [b, N (+ N*k)] against the (gathered) positives and hard
    negatives, each text counted once where keys are given; with the labels [b] and the global
    number of anchors. `gather_group` None: the local batch only."""
    local = queries.shape[0]
    if gather_group is not None:
        candidates, sizes = all_gather_with_sizes(raw_positives, gather_group)  # [N, d]
        candidates = normalized(candidates)
        offset = sum(sizes[:group_rank(gather_group)])
    else:
        candidates, sizes, offset = positives, [local], 0
    labels = offset + torch.arange(local, device=queries.device)
    logits = queries @ candidates.T  # [b, N]
    candidate_keys = None
    if positive_keys is not None:
        if positive_keys.shape != (local,):
            raise ValueError(f"positive_keys must be [b] = [{local}], got {tuple(positive_keys.shape)}")
        candidate_keys = (all_gather_with_grad(positive_keys, gather_group) if gather_group is not None
                          else positive_keys)  # [N]
    candidate_valid = torch.ones(logits.shape[1], dtype=torch.bool, device=queries.device)  # [N]
    if hard_negatives is not None:
        all_negatives, all_mask = hard_negatives, negative_mask
        if gather_group is not None:
            all_negatives = normalized(all_gather_with_grad(raw_negatives, gather_group))  # [N, k, d]
            all_mask = all_gather_with_grad(negative_mask, gather_group)
        negative_logits = queries @ all_negatives.flatten(0, 1).T  # [b, N*k]
        negative_logits = negative_logits.masked_fill(~all_mask.flatten(), float("-inf"))
        logits = torch.cat([logits, negative_logits], dim=1)  # [b, N + N*k]
        if candidate_keys is not None and negative_keys is not None:
            if negative_keys.shape != negative_mask.shape:
                raise ValueError(f"negative_keys must be [b, k] = {tuple(negative_mask.shape)}, "
                                 f"got {tuple(negative_keys.shape)}")
            all_negative_keys = (all_gather_with_grad(negative_keys, gather_group) if gather_group is not None
                                 else negative_keys)  # [N, k]
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
