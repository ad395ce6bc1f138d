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

The gather is an object a loss is built with (:class:`GroupGather`), not module state: what a loss
collects across ranks is what it was given. :class:`SharedGather` wraps one for the calls of one
loss evaluation (Matryoshka: one loss per truncation): a tensor gathered again is not gathered
again, the first result is reused, and a tensor registered as ``fn(full)`` with a row-wise ``fn``
(``derive``: a normalised prefix) is gathered as ``fn(gather(full))``. Row-wise operations commute
with a gather along dim 0, so the values are unchanged, the gradients of every use meet in one
backward, and a step moves each tensor once at full width instead of once per dim.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Protocol, Tuple

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


class Gather(Protocol):
    """What a loss gathers its candidates with (:class:`GroupGather`, :class:`SharedGather`)."""

    @property
    def size(self) -> int:
        """Ranks in the group (1: nothing to gather)."""

    @property
    def rank(self) -> int:
        """This process's rank in the group."""

    def sizes(self, tensor: torch.Tensor) -> List[int]:
        """Dim-0 size of `tensor` on every rank, in group-rank order."""

    def __call__(self, tensor: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """`tensor` [b_r, ...] concatenated over the ranks -> [sum_r b_r, ...], with every rank's b_r."""


class GroupGather:
    """All-gather along dim 0 with autograd over the ranks of `group` (module docstring).

    `group` follows torch.distributed: None is the default (world) group, which is the data-parallel
    group only without tensor/pipeline parallelism; pass the DP group otherwise. Backward hands each
    rank the gradient of the sum of every rank's loss w.r.t. its local slice. The identity when
    torch.distributed is not initialised or the group has one rank.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.reduce_scatter_works: Optional[bool] = None
        """Whether the backend ran reduce_scatter (gloo gained it only in recent torch versions);
        None until the first backward tries."""

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    def sizes(self, tensor: torch.Tensor) -> List[int]:
        return gather_sizes(tensor, self.group)

    def __call__(self, tensor: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        sizes = self.sizes(tensor)
        if len(sizes) == 1:
            return tensor, sizes
        if tensor.dtype == torch.bool:  # gloo cannot gather bool
            return _AllGatherWithGrad.apply(tensor.to(torch.uint8), self, sizes).bool(), sizes
        return _AllGatherWithGrad.apply(tensor, self, sizes), sizes

    def sum_local_slice(self, grad: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """This rank's rows of the SUM over the group of `grad` [N, ...] (ranks' slices of `sizes`)."""
        placement, rank = current_placement(), self.rank
        if self.reduce_scatter_works is not False:
            longest = max(sizes)
            padded = grad.new_zeros((len(sizes) * longest,) + tuple(grad.shape[1:]))  # [k * longest, ...]
            offsets = [sum(sizes[:r]) for r in range(len(sizes))]
            for r, (offset, size) in enumerate(zip(offsets, sizes)):
                padded[r * longest:r * longest + size] = grad[offset:offset + size]
            output = grad.new_empty((longest,) + tuple(grad.shape[1:]))
            try:
                placement.reduce_scatter(output, padded, group=self.group)
                self.reduce_scatter_works = True
                return output[:sizes[rank]]
            except (RuntimeError, NotImplementedError) as error:
                # refused locally, before any rank communicates, so every rank falls back alike
                if "not supported" not in str(error).lower() and "not implemented" not in str(error).lower():
                    raise
                self.reduce_scatter_works = False
        # all_reduce works in place and grad may be shared with other graph branches
        summed = placement.all_reduce(grad.contiguous().clone(), op=dist.ReduceOp.SUM, group=self.group)  # [N, ...]
        start = sum(sizes[:rank])
        return summed[start:start + sizes[rank]]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's slice; backward: SUM-reduce, keep the local slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, gather: GroupGather, sizes: List[int]) -> torch.Tensor:
        ctx.gather, ctx.sizes, ctx.rank = gather, sizes, gather.rank
        longest = max(sizes)
        if longest == 0:  # every rank is empty; all see the same sizes, so all skip alike
            return tensor.new_empty((0,) + tuple(tensor.shape[1:]))
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in sizes]
        current_placement().all_gather(pieces, padded, group=gather.group)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        start = sum(ctx.sizes[:ctx.rank])
        local = ctx.sizes[ctx.rank]
        if max(ctx.sizes) == 0:
            return grad_output[start:start + local], None, None
        return ctx.gather.sum_local_slice(grad_output, ctx.sizes), None, None


class SharedGather:
    """`gather` for the calls of one loss evaluation: results by input tensor, derived tensors by
    tensor (module docstring). Entries hold their tensors, so an id is never confused with a later
    tensor's. Build one per evaluation: it keeps what it gathered."""

    def __init__(self, gather: Optional[Gather]):
        self.gather = gather if gather is not None else GroupGather(None)
        self.results: Dict[int, Tuple[torch.Tensor, torch.Tensor, List[int]]] = {}
        self.derived: Dict[int, Tuple[torch.Tensor, torch.Tensor, Callable]] = {}  # id -> (derived, full, fn)

    @property
    def size(self) -> int:
        return self.gather.size

    @property
    def rank(self) -> int:
        return self.gather.rank

    def sizes(self, tensor: torch.Tensor) -> List[int]:
        return self.gather.sizes(tensor)

    def derive(self, full: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn(full), registered so that its gather is fn(gather(full)); fn must act row by row."""
        derived = fn(full)
        self.derived[id(derived)] = (derived, full, fn)
        return derived

    def __call__(self, tensor: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        if self.size == 1:
            return self.gather(tensor)
        known = self.derived.get(id(tensor))
        if known is not None and known[0] is tensor:
            gathered, sizes = self(known[1])
            return known[2](gathered), sizes
        done = self.results.get(id(tensor))
        if done is not None and done[0] is tensor:
            return done[1], done[2]
        gathered, sizes = self.gather(tensor)
        self.results[id(tensor)] = (tensor, gathered, sizes)
        return gathered, sizes
