"""Matryoshka over gathered InfoNCE moves each tensor once per step: a recording of the collectives
shows one gather (and one backward reduce-scatter) where separate per-dim calls make one per dim,
with the same loss and gradients."""

import torch
import torch.nn.functional as F

from megatron_conan.testing.distributed import run_distributed

DIMS = (4, 8, 12)
# torch 2.13 renamed reduce_scatter_tensor to reduce_scatter_single; the device seam calls whichever
# this torch has (torch >= 2.11 is supported)
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(torch.distributed, "reduce_scatter_single") \
    else "reduce_scatter_tensor"
RECORDED = ("all_gather", "all_reduce", REDUCE_SCATTER)


def _recording(counts):
    """Wrap torch.distributed's collectives so that each call is counted (the recording group)."""
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in RECORDED}

    def wrap(name):
        def recorded(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return recorded

    for name in RECORDED:
        setattr(dist, name, wrap(name))
    return originals


def _step(rank, shared):
    """Loss and encoder gradients of Matryoshka InfoNCE (with hard negatives and duplicate keys)."""
    from megatron_conan.losses.gather import GroupGather
    from megatron_conan.losses.infonce import InfoNCELoss
    from megatron_conan.losses.matryoshka import MatryoshkaLoss
    from megatron_conan.losses.targets import LossTargets

    g = torch.Generator().manual_seed(rank)
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 12, dtype=torch.float64)
    inputs = {"queries": torch.randn(3, 6, generator=g, dtype=torch.float64),
              "positives": torch.randn(3, 6, generator=g, dtype=torch.float64),
              "hard_negatives": torch.randn(3, 2, 6, generator=g, dtype=torch.float64)}
    embeddings = {role: encoder(x) for role, x in inputs.items()}
    targets = LossTargets(positive_keys=torch.tensor([1, 2, 1]) + 10 * rank,
                          negative_mask=torch.tensor([[True, False], [True, True], [True, True]]))
    loss_fn = InfoNCELoss(temperature=0.05, gather=GroupGather(torch.distributed.group.WORLD))
    if shared:
        loss, _ = MatryoshkaLoss(loss_fn, dims=DIMS)(embeddings, targets)
    else:  # one loss call, so one set of gathers, per dim
        loss = sum(loss_fn({role: F.normalize(e[..., :dim], dim=-1) for role, e in embeddings.items()}, targets)[0]
                   for dim in DIMS)
    loss.backward()
    return float(loss), encoder.weight.grad.clone()


def _body(rank, world_size):
    import torch.distributed as dist

    results = {}
    for shared in (True, False):
        counts = {}
        originals = _recording(counts)
        try:
            results[shared] = _step(rank, shared) + (counts,)
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
    return results


def test_one_gather_per_step_instead_of_one_per_dim():
    for results in run_distributed(_body, 2):
        shared_loss, shared_grad, shared_counts = results[True]
        separate_loss, separate_grad, separate_counts = results[False]
        assert abs(shared_loss - separate_loss) < 1e-12
        torch.testing.assert_close(shared_grad, separate_grad, rtol=0, atol=1e-12)
        # per gathered tensor (positives, hard negatives, keys, mask): a size exchange and the data
        assert separate_counts["all_gather"] == len(DIMS) * shared_counts["all_gather"] == len(DIMS) * 8
        # backward: one reduce-scatter per gathered float tensor, no all-reduce
        assert shared_counts.get(REDUCE_SCATTER) == 2
        assert separate_counts.get(REDUCE_SCATTER) == 2 * len(DIMS)
        assert "all_reduce" not in shared_counts and "all_reduce" not in separate_counts
