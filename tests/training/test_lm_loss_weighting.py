"""Issue 13 item 6: the LM loss of a step is the mean over every loss token of the global batch,
whatever the micro-batch split and the DP size (SFT sequences have very different numbers of loss
tokens, so a mean of per-micro-batch means would weigh their tokens unequally)."""

import pytest

from megatron_conan.testing.distributed import run_distributed
from megatron_conan.testing.parity import Layout, max_abs_diff

TOL = 1e-6


def _splits_body(rank, world_size, micro_batches, full_weights):
    from megatron_conan.testing.parity import one_step

    results = []
    for micro_batch in micro_batches:
        outcome = one_step(Layout(), full_weights, micro_batch=micro_batch, ragged_loss=True)
        results.append({k: outcome[k] for k in ("loss", "grads", "initial")})
    return results


@pytest.fixture(scope="module")
def single_process_splits():
    """One step on the whole global batch as one micro-batch, then split in 4, 2 and 1."""
    return run_distributed(_splits_body, 1, args=((8, 4, 2, 1), None))[0]


def test_micro_batch_split_does_not_change_loss_or_gradients(single_process_splits):
    whole, *splits = single_process_splits
    for outcome in splits:
        assert abs(outcome["loss"] - whole["loss"]) < TOL, (outcome["loss"], whole["loss"])
        diffs = max_abs_diff(outcome["grads"], whole["grads"])
        assert max(diffs.values()) < TOL, max(diffs.items(), key=lambda item: item[1])


def test_data_parallel_does_not_change_loss_or_gradients(single_process_splits):
    whole = single_process_splits[0]
    per_rank = run_distributed(_splits_body, 2, args=((2,), whole["initial"]))
    for rank_results in per_rank:
        outcome = rank_results[0]
        assert abs(outcome["loss"] - whole["loss"]) < TOL, (outcome["loss"], whole["loss"])
        diffs = max_abs_diff(outcome["grads"], whole["grads"])
        assert max(diffs.values()) < TOL


def test_the_split_matters_for_a_mean_of_means():
    """The ragged batch is one where the old per-micro-batch averaging gives another number."""
    import torch

    from megatron_conan.config.model import tiny
    from megatron_conan.testing.parity import synthetic_lm_batch

    mask = synthetic_lm_batch(tiny(), ragged_loss=True)["loss_mask"]  # [8, s]
    per_token = torch.linspace(0.5, 2.0, mask.shape[1]).expand_as(mask)  # any non-constant loss
    token_mean = float((per_token * mask).sum() / mask.sum())
    per_sequence = (per_token * mask).sum(1) / mask.sum(1)
    assert abs(float(per_sequence.mean()) - token_mean) > 1e-3
