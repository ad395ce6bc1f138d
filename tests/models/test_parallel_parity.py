"""Every supported layout equals the single-process run: loss, reduced gradients, updated weights.

Each spawned world runs several layouts in turn (re-initialising megatron-core's groups), which
keeps the number of process launches, and so the suite's wall time, small.
"""

import pytest
import torch

from megatron_conan.testing.distributed import run_distributed
from megatron_conan.testing.parity import Layout, layouts_body, max_abs_diff

TOL = 1e-5


def _meta_and_reference_body(rank, world_size):
    from megatron_conan.config.model import ParallelConfig, conan_1p4b
    from megatron_conan.models.transformer_config import build_transformer_config
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.testing.parity import one_step

    initialize_model_parallel(ParallelConfig())
    cfg = conan_1p4b()
    transformer_config = build_transformer_config(cfg, ParallelConfig(),
                                                  transformer_overrides={"perform_initialization": False})
    with torch.device("meta"):
        (model,) = build_model_chunks(cfg, transformer_config)
    meta = {
        "built": sum(p.numel() for p in model.parameters()),
        "closed_form": cfg.num_parameters(),
        "non_meta": [n for n, p in model.named_parameters() if p.device.type != "meta"],
        "kv_groups_per_rank": model.decoder.layers[0].self_attention.num_query_groups_per_partition,
    }
    return meta, one_step(Layout(), None)


@pytest.fixture(scope="module")
def single_process():
    meta, reference = run_distributed(_meta_and_reference_body, 1)[0]
    return meta, reference


def test_conan_1p4b_on_meta_device_matches_closed_form(single_process):
    meta, _ = single_process
    assert meta["non_meta"] == []
    assert meta["built"] == meta["closed_form"]
    assert abs(meta["built"] - 1_503e6) / 1_503e6 < 0.005
    assert meta["kv_groups_per_rank"] == 8


def _check(outcome, reference, compare_grads=True):
    layout = outcome["layout"]
    assert max(max_abs_diff(outcome["initial"], reference["initial"]).values()) == 0.0, layout
    assert abs(outcome["loss"] - reference["loss"]) < TOL, (layout, outcome["loss"], reference["loss"])
    if compare_grads:
        diffs = max_abs_diff(outcome["grads"], reference["grads"])
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] < TOL, (layout, worst, diffs[worst])
    diffs = max_abs_diff(outcome["updated"], reference["updated"])
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < TOL, (layout, "updated", worst, diffs[worst])


def test_two_process_layouts_equal_single_process(single_process):
    _, reference = single_process
    layouts = [
        Layout(tensor_parallel=2),
        Layout(pipeline_parallel=2),
        Layout(pipeline_parallel=2, virtual_pipeline_parallel=2),  # interleaved 1F1B
        Layout(tensor_parallel=2, sequence_parallel=True),
    ]
    per_rank = run_distributed(layouts_body, 2, args=(layouts, reference["initial"]))
    for outcome in per_rank[0]:
        _check(outcome, reference)
    for rank_outcomes in per_rank[1:]:
        for outcome in rank_outcomes:
            assert abs(outcome["loss"] - reference["loss"]) < TOL, outcome["layout"]


def test_four_process_layouts_equal_single_process(single_process):
    _, reference = single_process
    layouts = [
        Layout(tensor_parallel=2, pipeline_parallel=2),
        Layout(tensor_parallel=2),  # TP2 x DP2
        Layout(tensor_parallel=4),  # GQA: 4 KV groups over 4 ranks, one each
        Layout(tensor_parallel=2, use_distributed_optimizer=True),  # TP2 x DP2, ZeRO-1
        Layout(tensor_parallel=2, pipeline_parallel=2, sequence_parallel=True),
    ]
    per_rank = run_distributed(layouts_body, 4, args=(layouts, reference["initial"]))
    # GQA under TP: each rank holds whole KV groups (tiny: 8 heads over 4 groups, head dim 8), i.e.
    # groups/TP groups of (2 queries + 1 key + 1 value) heads in its QKV shard.
    tp4 = per_rank[0][2]
    assert tp4["layout"] == "TP4xPP1" and tp4["kv_groups_per_rank"] == 1
    assert tp4["qkv_rows_per_rank"] == 1 * (2 + 2) * 8
    tp2 = per_rank[0][1]
    assert tp2["kv_groups_per_rank"] == 2 and tp2["qkv_rows_per_rank"] == 2 * (2 + 2) * 8
    for outcome in per_rank[0]:
        # The distributed optimizer reduce-scatters: each DP rank keeps only its shard of the
        # reduced gradient, so the check there is the update itself.
        _check(outcome, reference, compare_grads="DistOpt" not in outcome["layout"])
