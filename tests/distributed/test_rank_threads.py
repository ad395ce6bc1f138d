"""Spawned ranks share the machine's cores: each gets cores / ranks intra-op threads (a one-rank world
uses every core), and their OpenMP threads wait passively."""

import os

from megatron_conan.distributed.spawn import run_distributed, threads_per_rank


def test_cores_are_divided_by_the_ranks():
    assert threads_per_rank(1, cores=2) == 2
    assert threads_per_rank(2, cores=2) == 1
    assert threads_per_rank(4, cores=2) == 1  # never 0
    assert threads_per_rank(3, cores=16) == 5
    assert threads_per_rank(8) >= 1


def _threads(rank, world_size):
    import torch

    return torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY")


def test_a_one_rank_world_uses_every_core():
    threads, policy = run_distributed(_threads, 1)[0]
    assert threads == threads_per_rank(1) == len(os.sched_getaffinity(0))
    assert policy == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
