"""All-gather along dim 0 with autograd: contrastive candidates shared across data-parallel ranks.

Gradient contract (see also README.md beside this file). Rank r of a group of k ranks holds b_r
local anchors out of N = sum_r b_r and computes the loss of the *global* batch (its anchors scored
against the gathered candidates of every rank) weighted over its own anchors only::

    L_r = (k / N) * sum_{i on r} l_i        (= the mean over its anchors when every b_r = N / k)

The candidates a rank gathered from rank s feed L_r, so the gradient that belongs to rank s's local
slice is the sum over every rank's loss: ``dL_r/dx_s`` for all r. Backward therefore all-reduces
the incoming gradient with SUM and keeps this rank's slice: rank s ends with
``d(sum_r L_r)/dx_s`` for its local tensors, and each rank's parameter gradient is the part of
``d(sum_r L_r)/dtheta`` that flows through its own activations. Megatron DDP all-reduces parameter
gradients and scales them by 1/k (``gradient_scaling_factor = 1 / dp_size``), giving
``d((1/k) sum_r L_r)/dtheta = d((1/N) sum_i l_i)/dtheta``: exactly the gradient of the
single-process loss on the concatenated batch. The backward is a reduce-scatter of the (padded)
gradient: each rank receives only its own summed slice, half the traffic of all-reduce plus slice;
a backend without reduce-scatter falls back to the all-reduce (same numbers). (An AVG all-reduce in backward would divide that by
k a second time; keeping only the local gradient would drop every other rank's use of our
candidates.) Activation gradients are not averaged by DDP, so the local slices of them,
concatenated over ranks, are k times the single-process activation gradient.

Unequal per-rank sizes (the contrastive loader gives near-equal slices, and B = 0 on some ranks
for the last partial batch) are supported: the shapes are gathered first, every rank pads to the
longest, and the padding is dropped after the gather. Trailing dimensions must agree across ranks;
a mismatch raises the same ValueError on every rank (no rank is left waiting in a collective).
Every rank of the group must call the gather, and later run backward through it, the same number
of times in the same order: they are collectives.

Without an initialised torch.distributed (or with a group of one rank) the gather is the identity.

Inside ``shared_gathers()`` (Matryoshka: one loss per truncation) a tensor gathered again is not
gathered again: the first result is reused, and a tensor registered as ``fn(full)`` with a row-wise
``fn`` (``scope.derive``: a normalised prefix) is gathered as ``fn(gather(full))``. Row-wise
operations commute with a gather along dim 0, so the values are unchanged, the gradients of every
use meet in one backward, and a step moves each tensor once at full width instead of once per dim.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_conan.distributed.device import current_placement

_MAX_DIMS = 8
"""Shapes travel as a fixed-size descriptor [ndim, size_0, ..., size_7]: ranks can compare them."""


def group_size(group: Optional[dist.ProcessGroup] = None) -> int:
    """Ranks in `group` (None: the default group); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup] = None) -> int:
    """This process's rank within `group`; 0 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def gather_sizes(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> List[int]:
    """Dim-0 size of `tensor` on every rank of `group`, in group-rank order.

    Raises ValueError on every rank alike when the ranks' trailing dimensions differ.
    """
    if group_size(group) == 1:
        return [int(tensor.shape[0])]
    if not 1 <= tensor.dim() <= _MAX_DIMS:
        raise ValueError(f"can only gather tensors of 1 to {_MAX_DIMS} dimensions, "
                         f"got shape {tuple(tensor.shape)}")
    placement = current_placement()
    descriptor = placement.zeros(_MAX_DIMS + 1, dtype=torch.int64)
    descriptor[0] = tensor.dim()
    descriptor[1:tensor.dim() + 1] = placement.tensor(tensor.shape, dtype=torch.int64)
    descriptors = [torch.empty_like(descriptor) for _ in range(group_size(group))]
    placement.all_gather(descriptors, descriptor, group=group)
    shapes = [tuple(int(v) for v in d[1:int(d[0]) + 1].tolist()) for d in descriptors]
    if len({shape[1:] for shape in shapes}) != 1:
        raise ValueError(f"all_gather_with_grad: the ranks' tensors differ beyond dim 0 "
                         f"(shapes by rank: {shapes})")
    return [shape[0] for shape in shapes]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's slice; backward: SUM-reduce, keep the local slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, sizes: List[int]) -> torch.Tensor:
        ctx.group, ctx.sizes, ctx.rank = group, sizes, dist.get_rank(group)
        longest = max(sizes)
        if longest == 0:  # every rank is empty; all see the same sizes, so all skip alike
            return tensor.new_empty((0,) + tuple(tensor.shape[1:]))
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in sizes]
        current_placement().all_gather(pieces, padded, group=group)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        start = sum(ctx.sizes[:ctx.rank])
        local = ctx.sizes[ctx.rank]
        if max(ctx.sizes) == 0:
            return grad_output[start:start + local], None, None
        return _sum_local_slice(grad_output, ctx.sizes, ctx.rank, ctx.group), None, None


_reduce_scatter_works: Dict[str, bool] = {}
"""Per backend: whether reduce_scatter_tensor ran (gloo gained it only in recent torch versions)."""


def _sum_local_slice(grad: torch.Tensor, sizes: List[int], rank: int, group) -> torch.Tensor:
    """This rank's rows of the SUM over the group of `grad` [N, ...] (ranks' slices of `sizes`)."""
    placement = current_placement()
    backend = dist.get_backend(group)
    if _reduce_scatter_works.get(backend, True):
        longest = max(sizes)
        padded = grad.new_zeros((len(sizes) * longest,) + tuple(grad.shape[1:]))  # [k * longest, ...]
        offsets = [sum(sizes[:r]) for r in range(len(sizes))]
        for r, (offset, size) in enumerate(zip(offsets, sizes)):
            padded[r * longest:r * longest + size] = grad[offset:offset + size]
        output = grad.new_empty((longest,) + tuple(grad.shape[1:]))
        try:
            placement.reduce_scatter(output, padded, group=group)
            _reduce_scatter_works[backend] = True
            return output[:sizes[rank]]
        except (RuntimeError, NotImplementedError) as error:
            # refused locally, before any rank communicates, so every rank falls back alike
            if "not supported" not in str(error).lower() and "not implemented" not in str(error).lower():
                raise
            _reduce_scatter_works[backend] = False
    # all_reduce works in place and grad may be shared with other graph branches
    summed = placement.all_reduce(grad.contiguous().clone(), op=dist.ReduceOp.SUM, group=group)  # [N, ...]
    start = sum(sizes[:rank])
    return summed[start:start + sizes[rank]]


class _SharedGathers:
    """The gathers of one `shared_gathers()` scope: results by (input tensor, group), derived tensors
    by tensor. Entries hold their tensors, so an id is never confused with a later tensor's."""

    def __init__(self):
        self.results: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor, List[int]]] = {}
        self.derived: Dict[int, Tuple[torch.Tensor, torch.Tensor, Callable]] = {}  # id -> (derived, full, fn)

    def derive(self, full: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn(full), registered so that its gather is fn(gather(full)); fn must act row by row."""
        derived = fn(full)
        self.derived[id(derived)] = (derived, full, fn)
        return derived

    def gather(self, tensor: torch.Tensor, group) -> Tuple[torch.Tensor, List[int]]:
        known = self.derived.get(id(tensor))
        if known is not None and known[0] is tensor:
            gathered, sizes = self.gather(known[1], group)
            return known[2](gathered), sizes
        key = (id(tensor), id(group))
        done = self.results.get(key)
        if done is not None and done[0] is tensor:
            return done[1], done[2]
        gathered, sizes = _gather(tensor, group)
        self.results[key] = (tensor, gathered, sizes)
        return gathered, sizes


_scope: List[_SharedGathers] = []


@contextlib.contextmanager
def shared_gathers() -> Iterator[_SharedGathers]:
    """A scope in which each tensor is gathered once (module docstring); `.derive(full, fn)` gives
    tensors whose gathers are computed from the full one's."""
    scope = _SharedGathers()
    _scope.append(scope)
    try:
        yield scope
    finally:
        _scope.pop()


def _gather(tensor: torch.Tensor, group) -> Tuple[torch.Tensor, List[int]]:
    sizes = gather_sizes(tensor, group)
    if len(sizes) == 1:
        return tensor, sizes
    if tensor.dtype == torch.bool:  # gloo cannot gather bool
        return _AllGatherWithGrad.apply(tensor.to(torch.uint8), group, sizes).bool(), sizes
    return _AllGatherWithGrad.apply(tensor, group, sizes), sizes


def all_gather_with_sizes(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None
                          ) -> Tuple[torch.Tensor, List[int]]:
    """`all_gather_with_grad` that also returns every rank's dim-0 size (group-rank order)."""
    if _scope and group_size(group) > 1:
        return _scope[-1].gather(tensor, group)
    return _gather(tensor, group)


def all_gather_with_grad(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None
                         ) -> torch.Tensor:
    """Concatenate `tensor` [b_r, ...] over the ranks of `group` along dim 0 -> [sum_r b_r, ...].

    `group` follows torch.distributed: None is the default (world) group, which is the
    data-parallel group only without tensor/pipeline parallelism; pass the DP group otherwise.
    Backward hands each rank the gradient of the sum of every rank's loss w.r.t. its local slice
    (module docstring). Identity when torch.distributed is not initialised.
    """
    return all_gather_with_sizes(tensor, group)[0]
