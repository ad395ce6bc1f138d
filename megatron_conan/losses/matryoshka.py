"""Matryoshka representation loss: the same loss on truncated, re-normalised embedding prefixes.

    total = sum_{m in dims, m <= width} w_m * loss_fn(normalise(e[..., :m]) for every role e)

Dims wider than the embedding are dropped and the full width is always included, so a narrow test
model (or a model wider than the largest dim) trains on its whole embedding too.

The per-dim losses run in one ``shared_gathers()`` scope (losses/gather.py): a loss that gathers
candidates over the data-parallel group gathers them once, at full width, and each dim's prefix is
sliced from that gather; the gradients of every dim meet in one backward collective.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_conan.losses.gather import shared_gathers

DEFAULT_DIMS = (256, 512, 1024, 1536, 2048, 3072, 3584)


class MatryoshkaLoss(NamedTuple):
    total: torch.Tensor
    """Weighted sum of the per-dim losses."""
    per_dim: Dict[int, torch.Tensor]
    """Loss at each truncation (unweighted), by dim, ascending."""
    stats: Dict[int, Dict[str, torch.Tensor]]
    """The stats dict loss_fn returned at each dim (empty dicts when it returns a bare tensor)."""


def matryoshka_dims(width: int, dims: Sequence[int] = DEFAULT_DIMS) -> list:
    """The truncations used for embeddings of `width` features: dims <= width, plus width."""
    if any(dim <= 0 for dim in dims):
        raise ValueError(f"matryoshka dims must be positive, got {tuple(dims)}")
    return sorted({dim for dim in dims if dim <= width} | {width})


def matryoshka_loss(
    loss_fn: Callable[..., object],
    embeddings_by_role: Mapping[str, Optional[torch.Tensor]],
    dims: Sequence[int] = DEFAULT_DIMS,
    weights: Optional[Mapping[int, float]] = None,
) -> MatryoshkaLoss:
    """Call ``loss_fn(**{role: prefix})`` at every truncation and sum the weighted losses.

    embeddings_by_role: keyword arguments of loss_fn holding embeddings [..., width] (all the same
    width; None values pass through untouched, e.g. ``hard_negatives=None``). Bind any other
    argument with functools.partial. loss_fn returns a loss tensor or a ``(loss, stats)`` pair
    (as infonce_loss does). weights: {dim: weight}; a dim not listed weighs 1.0.
    """
    widths = {role: tensor.shape[-1] for role, tensor in embeddings_by_role.items()
              if tensor is not None}
    if not widths:
        raise ValueError("matryoshka_loss needs at least one embedding tensor")
    if len(set(widths.values())) != 1:
        raise ValueError(f"all embeddings must have the same width, got {widths}")
    width = next(iter(widths.values()))
    per_dim, stats = {}, {}
    total = None
    with shared_gathers() as scope:
        for dim in matryoshka_dims(width, dims):
            truncated = {role: None if tensor is None else scope.derive(tensor, functools.partial(_prefix, dim=dim))
                         for role, tensor in embeddings_by_role.items()}
            result = loss_fn(**truncated)
            loss, stats[dim] = result if isinstance(result, tuple) else (result, {})
            per_dim[dim] = loss
            weighted = loss * (1.0 if weights is None else weights.get(dim, 1.0))
            total = weighted if total is None else total + weighted
    return MatryoshkaLoss(total, per_dim, stats)


def _prefix(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """The re-normalised first `dim` features (row-wise: it commutes with a gather along dim 0)."""
    return F.normalize(tensor[..., :dim], dim=-1)
