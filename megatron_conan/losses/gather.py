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
single-process loss on the concatenated batch. (An AVG all-reduce in backward would divide that by
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
"""

from __future__ import annotations

from typing import List, Optional, Tuple

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
        # all_reduce works in place and grad_output may be shared with other graph branches
        grad = grad_output.contiguous().clone()  # [N, ...]
        current_placement().all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[start:start + local], None, None


def all_gather_with_sizes(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None
                          ) -> Tuple[torch.Tensor, List[int]]:
    """`all_gather_with_grad` that also returns every rank's dim-0 size (group-rank order)."""
    sizes = gather_sizes(tensor, group)
    if len(sizes) == 1:
        return tensor, sizes
    return _AllGatherWithGrad.apply(tensor, group, sizes), sizes


def all_gather_with_grad(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None
                         ) -> torch.Tensor:
    """Concatenate `tensor` [b_r, ...] over the ranks of `group` along dim 0 -> [sum_r b_r, ...].

    `group` follows torch.distributed: None is the default (world) group, which is the
    data-parallel group only without tensor/pipeline parallelism; pass the DP group otherwise.
    Backward hands each rank the gradient of the sum of every rank's loss w.r.t. its local slice
    (module docstring). Identity when torch.distributed is not initialised.
    """
    return all_gather_with_sizes(tensor, group)[0]
