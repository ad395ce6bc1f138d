"""The distributed test harness itself: results, rank-tagged failures, no hangs."""

import time

import pytest
import torch.distributed as dist

from megatron_conan.testing.distributed import harness_backend, run_distributed


def _all_reduce_rank(rank, world_size):
    import torch

    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return rank, float(value)


def _rank_one_raises(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 would block here forever without the harness's handling
    return rank


def _rank_one_hangs(rank, world_size):
    if rank == 1:
        time.sleep(3600)
    return rank


def test_results_come_back_in_rank_order():
    assert run_distributed(_all_reduce_rank, 2) == [(0, 1.0), (1, 1.0)]


def test_failing_rank_fails_the_call_with_its_traceback_tagged():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)rank 1 -----.*boom on purpose"):
        run_distributed(_rank_one_raises, 2, timeout_s=120)
    assert time.monotonic() - start < 60


def test_hung_rank_times_out_instead_of_hanging():
    with pytest.raises(AssertionError, match=r"(?s)rank 1 -----.*timed out"):
        run_distributed(_rank_one_hangs, 2, timeout_s=15)


@pytest.mark.parametrize("world_size,gpus,expected", [
    (1, 0, "gloo"), (4, 0, "gloo"),      # no GPU
    (1, 1, "nccl"), (2, 1, "gloo"),      # one GPU: NCCL refuses two ranks on it
    (4, 8, "nccl"), (8, 8, "nccl"), (9, 8, "gloo"),
])
def test_nccl_only_with_one_gpu_per_rank(world_size, gpus, expected):
    assert harness_backend(world_size, gpus) == expected
