"""Matryoshka representation loss: the same loss on truncated, re-normalised embedding prefixes.

    total = sum_{m in dims, m <= width} w_m * loss(normalise(e[..., :m]) for every role e)

Dims wider than the embedding are dropped and the full width is always included, so a narrow test
model (or a model wider than the largest dim) trains on its whole embedding too.

:class:`MatryoshkaLoss` wraps a loss (sentence-transformers' ``MatryoshkaLoss(model, loss, dims)``
shape). Its per-dim calls share one :class:`~megatron_conan.losses.gather.SharedGather` over the
inner loss's own gather, handed to it with ``with_gather``: a loss that gathers candidates over the
data-parallel group gathers them once, at full width, and each dim's prefix is sliced from that
gather; the gradients of every dim meet in one backward collective.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_conan.losses.gather import Gather, SharedGather
from megatron_conan.losses.targets import EmbeddingLoss, LossTargets

DEFAULT_DIMS = (256, 512, 1024, 1536, 2048, 3072, 3584)


def matryoshka_dims(width: int, dims: Sequence[int] = DEFAULT_DIMS) -> list:
    """The truncations used for embeddings of `width` features: dims <= width, plus width."""
    if any(dim <= 0 for dim in dims):
        raise ValueError(f"matryoshka dims must be positive, got {tuple(dims)}")
    return sorted({dim for dim in dims if dim <= width} | {width})


@dataclasses.dataclass(frozen=True)
class Prefix:
    """The re-normalised first `dim` features of each row (row-wise: it commutes with a gather along
    dim 0)."""

    dim: int

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return F.normalize(tensor[..., :self.dim], dim=-1)


@dataclasses.dataclass(frozen=True)
class MatryoshkaLoss:
    """`loss` summed over the Matryoshka truncations of every role's embeddings (module docstring).

    Returns ``(total, stats)``: the weighted sum, the inner loss's statistics at the full width, and
    ``loss_dim_<m>`` (unweighted, detached) for every dim. weights: {dim: weight}; a dim not listed
    weighs 1.0.
    """

    loss: EmbeddingLoss
    dims: Sequence[int] = DEFAULT_DIMS
    weights: Optional[Mapping[int, float]] = None

    @property
    def gather(self) -> Optional[Gather]:
        return self.loss.gather

    def with_gather(self, gather: Optional[Gather]) -> "MatryoshkaLoss":
        return dataclasses.replace(self, loss=self.loss.with_gather(gather))

    def __call__(self, embeddings: Mapping[str, torch.Tensor], targets: LossTargets
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        widths = {role: tensor.shape[-1] for role, tensor in embeddings.items()}
        if not widths:
            raise ValueError("a Matryoshka loss needs at least one embedding tensor")
        if len(set(widths.values())) != 1:
            raise ValueError(f"all embeddings must have the same width, got {widths}")
        shared = SharedGather(self.loss.gather)
        inner = self.loss.with_gather(shared)
        total, stats, per_dim = None, {}, {}
        # the weighted sum grows dim by dim, as each dim's loss is built: the backward then visits
        # the graph in the order it always has (the goldens hold its float sums bit for bit)
        for dim in matryoshka_dims(next(iter(widths.values())), self.dims):
            truncated = {role: shared.derive(tensor, Prefix(dim)) for role, tensor in embeddings.items()}
            per_dim[dim], stats = inner(truncated, targets)
            weighted = per_dim[dim] * (1.0 if self.weights is None else self.weights.get(dim, 1.0))
            total = weighted if total is None else total + weighted
        stats = dict(stats)  # the full width's: the last dim
        stats.update({f"loss_dim_{dim}": loss.detach() for dim, loss in per_dim.items()})
        return total, stats
