"""Gathered InfoNCE under data parallelism equals the single-process loss on the concatenated batch.

Each spawned rank embeds its shard of a global batch with the same tiny linear encoder, computes
the loss with candidates gathered over its data-parallel group, and runs backward. Averaging the
ranks' parameter gradients (what megatron DDP does) must give the single-process parameter
gradient; the ranks' embedding gradients, concatenated and scaled by the same 1/k, the
single-process embedding gradients; the mean of the ranks' losses, the single-process loss. Shards
are equal and unequal (one rank empty), over the whole world and over strided subgroups (a DP group
inside a TP x DP world, so group rank != global rank). One spawn per world size.
"""

import pytest
import torch

from megatron_conan.testing.distributed import run_distributed

IN_FEATURES, WIDTH, NEGATIVES, TEMPERATURE = 5, 8, 2, 0.05
TOL = 1e-9  # fp64; the brief's bound is 1e-6
CASES = ("pairs", "hard_negatives", "classification", "matryoshka")
LAYOUTS = {
    2: {"equal": ([[0, 1]], [3, 3]), "unequal": ([[0, 1]], [4, 1])},
    4: {"equal": ([[0, 1, 2, 3]], [2, 2, 2, 2]), "unequal": ([[0, 1, 2, 3]], [3, 1, 0, 2]),
        "subgroups": ([[0, 2], [1, 3]], [2, 3])},
}
"""world size -> layout -> (DP groups as lists of global ranks, batch size by group rank)."""


def _global_batch(total, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(total, NEGATIVES, dtype=torch.bool)
    mask[::3, 1] = False  # some examples have fewer negatives: padding slots
    return {
        "queries": torch.randn(total, IN_FEATURES, generator=generator, dtype=torch.float64),
        "positives": torch.randn(total, IN_FEATURES, generator=generator, dtype=torch.float64),
        "negatives": torch.randn(total, NEGATIVES, IN_FEATURES, generator=generator,
                                 dtype=torch.float64),
        "mask": mask,
    }


def _loss_and_grads(batch, case, group):
    """Loss and gradients of one rank (or of the single process when group is None)."""
    from megatron_conan.losses.gather import GroupGather
    from megatron_conan.losses.infonce import InfoNCELoss
    from megatron_conan.losses.matryoshka import MatryoshkaLoss
    from megatron_conan.losses.targets import LossTargets

    torch.manual_seed(0)
    encoder = torch.nn.Linear(IN_FEATURES, WIDTH, dtype=torch.float64)
    embeddings = {"queries": encoder(batch["queries"]), "positives": encoder(batch["positives"])}
    with_negatives = case != "pairs"
    if with_negatives:
        embeddings["hard_negatives"] = encoder(batch["negatives"])  # [b, k, WIDTH]
    for embedding in embeddings.values():
        embedding.retain_grad()
    loss_fn = InfoNCELoss(temperature=TEMPERATURE, gather=None if group is None else GroupGather(group),
                          in_batch_negatives=case != "classification")
    if case == "matryoshka":
        loss_fn = MatryoshkaLoss(loss_fn, dims=(4, 6))
    loss, _ = loss_fn(embeddings, LossTargets(negative_mask=batch["mask"] if with_negatives else None))
    loss.backward()
    result = {"loss": loss.detach(), "weight": encoder.weight.grad, "bias": encoder.bias.grad}
    result.update({role: embedding.grad for role, embedding in embeddings.items()})
    return result


def _shard(batch, sizes, group_rank):
    start = sum(sizes[:group_rank])
    return {name: value[start:start + sizes[group_rank]] for name, value in batch.items()}


def _data_parallel_body(rank, world_size):
    import torch.distributed as dist

    from megatron_conan.losses.gather import GroupGather

    results = {}
    for layout, (groups, sizes) in LAYOUTS[world_size].items():
        handles = [dist.new_group(members) for members in groups]  # every rank creates every group
        index = next(i for i, members in enumerate(groups) if rank in members)
        batch = _shard(_global_batch(sum(sizes), seed=index), sizes, groups[index].index(rank))
        for case in CASES:
            results[layout, case] = _loss_and_grads(batch, case, handles[index])
    if world_size == 2:
        try:
            GroupGather()(torch.zeros(2, 3 + rank))
        except ValueError as error:
            results["mismatch"] = str(error)
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_data_parallel_equals_single_process(world_size):
    per_rank = run_distributed(_data_parallel_body, world_size)
    for layout, (groups, sizes) in LAYOUTS[world_size].items():
        for index, members in enumerate(groups):
            ranks = len(members)
            for case in CASES:
                reference = _loss_and_grads(_global_batch(sum(sizes), seed=index), case, None)
                outcomes = [per_rank[rank][layout, case] for rank in members]
                where = (world_size, layout, members, case)
                loss = sum(outcome["loss"] for outcome in outcomes) / ranks
                assert abs(float(loss - reference["loss"])) < TOL, where
                for name in ("weight", "bias"):  # DDP: the mean over the data-parallel ranks
                    averaged = sum(outcome[name] for outcome in outcomes) / ranks
                    torch.testing.assert_close(averaged, reference[name], rtol=0, atol=TOL,
                                               msg=lambda m: f"{where} {name}: {m}")
                for role in ("queries", "positives", "hard_negatives"):
                    if role not in reference:
                        continue
                    concatenated = torch.cat([outcome[role] for outcome in outcomes]) / ranks
                    torch.testing.assert_close(concatenated, reference[role], rtol=0, atol=TOL,
                                               msg=lambda m: f"{where} {role}: {m}")
    if world_size == 2:
        for rank in range(2):
            assert "differ beyond dim 0" in per_rank[rank]["mismatch"]
