"""The dry-run arithmetic against hand-computed values for the 1.4B recipe on 64 GPUs."""

import math
import tracemalloc

import pytest

from megatron_conan.config.model import ParallelConfig, conan_1p4b, tiny
from megatron_conan.errors import ConfigError
from megatron_conan.training.dry_run import (
    activation_bytes_per_layer,
    dry_run_report,
    estimate_memory_per_gpu,
    format_dry_run,
    model_flops_per_token,
    rank_coordinates,
    stage_parameters,
)

GLOBAL_BATCH, SEQ, WORLD = 256, 4096, 64

# Conan-1.4B by hand: h 3584, 8 layers, 32 heads / 8 groups of 112, SwiGLU 8192, vocab 150,000
# padded to 150,016 (a multiple of 128 and of 256).
QKV = 3584 * 112 * (32 + 2 * 8)
PROJ = 32 * 112 * 3584
MLP = 3 * 3584 * 8192
NORMS = 2 * 3584
EMBEDDING = 150_016 * 3584
NON_EMBEDDING = 8 * (QKV + PROJ + MLP + NORMS) + 3584


def dp64():
    return ParallelConfig()


def tp2_pp2(**kwargs):
    return ParallelConfig(tensor_parallel=2, pipeline_parallel=2, **kwargs)


def test_flops_per_token_is_the_b3_formula_with_the_true_vocab():
    expected = 6 * NON_EMBEDDING + 6 * 150_000 * 3584 + 12 * 8 * 3584 * SEQ
    assert model_flops_per_token(conan_1p4b(), SEQ) == expected == 10_404_516_864


def test_stage_parameters_by_hand():
    model = conan_1p4b()
    assert stage_parameters(model, dp64()) == [NON_EMBEDDING + EMBEDDING] == [model.num_parameters()]
    per_layer_shard = (QKV + PROJ + MLP) // 2 + NORMS
    first = 4 * per_layer_shard + EMBEDDING // 2
    last = 4 * per_layer_shard + 3584 + EMBEDDING // 2  # final norm + tied embedding copy
    assert stage_parameters(model, tp2_pp2()) == [first, last]
    assert last == 509_246_976


def test_memory_dp64_by_hand():
    model = conan_1p4b()
    params = NON_EMBEDDING + EMBEDDING
    memory = estimate_memory_per_gpu(model, dp64(), WORLD, 1, SEQ, "bf16", False, "none")
    assert memory["weights"] == 2 * params
    assert memory["gradients"] == 4 * params
    assert memory["optimizer"] == 12 * params
    # Per layer (bf16, no TP): 4h + 2d(a+g) + 3f elements per token, plus the fp32 LSE.
    layer = SEQ * 2 * (4 * 3584 + 2 * 112 * 40 + 3 * 8192) + 4 * 32 * SEQ
    head = 2 * SEQ * 2 * 3584 + 4 * SEQ * 150_016
    assert memory["activations"] == 8 * layer + head
    assert memory["total"] == sum(memory[k] for k in ("weights", "gradients", "optimizer", "activations"))

    distributed = estimate_memory_per_gpu(model, dp64(), WORLD, 1, SEQ, "bf16", True, "none")
    assert distributed["optimizer"] == math.ceil(12 * params / 64)
    for key in ("weights", "gradients", "activations"):
        assert distributed[key] == memory[key]


def test_memory_tp2_pp2_by_hand_and_ordering():
    model = conan_1p4b()
    last_stage_params = 509_246_976
    memory = estimate_memory_per_gpu(model, tp2_pp2(sequence_parallel=True), WORLD, 1, SEQ,
                                     "bf16", True, "none", num_microbatches=16)
    assert memory["weights"] == 2 * last_stage_params
    assert memory["gradients"] == 4 * last_stage_params
    assert memory["optimizer"] == math.ceil(12 * last_stage_params / 16)
    layer = (SEQ * 2 * (4 * 3584 + 2 * 112 * 40 + 3 * 8192) + 4 * 32 * SEQ) // 2  # all /t with SP
    first_stage = 2 * 4 * layer  # two micro-batches in flight
    last_stage = 4 * layer + (2 * SEQ * 2 * 3584 + 4 * SEQ * 150_016) // 2
    assert memory["activations"] == max(first_stage, last_stage) == last_stage

    single = estimate_memory_per_gpu(model, dp64(), WORLD, 1, SEQ, "bf16", True, "none")
    assert memory["weights"] < single["weights"] / 2
    assert memory["activations"] < single["activations"]


def test_sequence_parallel_and_recompute_shrink_activations():
    model = conan_1p4b()
    sizes = {
        (sp, mode): activation_bytes_per_layer(model, 1, SEQ, 2, sp, "bf16", mode)
        for sp in (False, True) for mode in ("none", "selective", "full")
    }
    for mode in ("none", "selective", "full"):
        assert sizes[(True, mode)] < sizes[(False, mode)]
    for sp in (False, True):
        assert sizes[(sp, "full")] < sizes[(sp, "selective")] < sizes[(sp, "none")]
    assert sizes[(False, "full")] == SEQ * 2 * 3584
    assert activation_bytes_per_layer(model, 1, SEQ, 1, False, "fp32", "full") == SEQ * 4 * 3584


def test_fp32_has_no_master_copy():
    model = tiny()
    params = model.num_parameters()
    memory = estimate_memory_per_gpu(model, ParallelConfig(), 1, 2, 64, "fp32", False, "none")
    assert memory["weights"] == memory["gradients"] == 4 * params
    assert memory["optimizer"] == 8 * params


@pytest.mark.parametrize("parallel", [dp64(), tp2_pp2(sequence_parallel=True)])
def test_report_batch_arithmetic(parallel):
    report = dry_run_report(conan_1p4b(), parallel, WORLD, GLOBAL_BATCH, 1, SEQ, token_budget=3e12)
    dp = WORLD // (parallel.tensor_parallel * parallel.pipeline_parallel)
    assert report.data_parallel == dp
    assert report.gradient_accumulation_steps == GLOBAL_BATCH // dp
    assert report.tokens_per_step == 256 * 4096
    assert report.steps_for_budget == math.ceil(3e12 / (256 * 4096)) == 2_861_023
    assert report.flops_per_step == report.flops_per_token * 256 * 4096
    assert all(value > 0 for value in report.memory.values())


def test_report_text_tp2_pp2():
    report = dry_run_report(conan_1p4b(), tp2_pp2(sequence_parallel=True,
                            use_distributed_optimizer=True), WORLD, GLOBAL_BATCH, 1, SEQ,
                            token_budget=3e12)
    text = format_dry_run(report)
    assert str(report) == text
    assert "parallel layout: world 64 = TP 2 x PP 2 x DP 16" in text
    assert "sequence parallel: on" in text and "distributed optimizer: on" in text
    assert "rank    0 -> tp 0, pp 0, dp 0" in text
    assert "rank    1 -> tp 1, pp 0, dp 0" in text
    assert "rank    2 -> tp 0, pp 0, dp 1" in text
    assert "rank   15 -> tp 1, pp 0, dp 7" in text
    assert "rank   16 " not in text and "    ..." in text
    assert "gradient-accumulation steps 16" in text
    assert "tokens per step: 1,048,576 (256 x 4096)" in text
    assert "steps for 3e+12 tokens: 2,861,023" in text
    assert "1,499,262,464 parameters" in text
    assert "parameters per GPU (largest stage): 509,246,976" in text
    for name in ("weights", "gradients", "optimizer", "activations", "total"):
        assert f"  {name:<12}" in text and "GiB" in text


def test_report_text_dp64_and_small_world_has_no_ellipsis():
    text = format_dry_run(dry_run_report(conan_1p4b(), dp64(), WORLD, GLOBAL_BATCH, 1, SEQ))
    assert "world 64 = TP 1 x PP 1 x DP 64" in text
    assert "rank   15 -> tp 0, pp 0, dp 15" in text
    assert "gradient-accumulation steps 4" in text
    assert "steps for" not in text
    small = format_dry_run(dry_run_report(tiny(), ParallelConfig(tensor_parallel=2), 4, 8, 2, 64))
    assert "rank    3 -> tp 1, pp 0, dp 1" in small and "..." not in small


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 8), (2, 2, 16), (4, 2, 64), (2, 4, 32), (1, 4, 8)])
def test_rank_coordinates_match_megatron_core(tp, pp, world):
    from megatron.core.parallel_state import RankGenerator

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    dp = world // (tp * pp)
    generator = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    for axis, index in (("tp", 0), ("pp", 1), ("dp", 2)):
        for group in generator.get_ranks(axis):
            # Within a group only that axis varies, and it runs 0..size-1 in rank order.
            coords = [rank_coordinates(rank, parallel, world) for rank in group]
            assert [c[index] for c in coords] == list(range(len(group)))
            others = {tuple(v for i, v in enumerate(c) if i != index) for c in coords}
            assert len(others) == 1


def test_errors_are_named():
    model = conan_1p4b()
    with pytest.raises(ConfigError, match="global_batch_size \\(256\\) is not divisible by micro_batch_size"):
        dry_run_report(model, dp64(), WORLD, GLOBAL_BATCH, 3, SEQ)
    with pytest.raises(ConfigError, match="global_batch_size \\(100\\).*2 \\* 64 = 128"):
        dry_run_report(model, dp64(), WORLD, 100, 2, SEQ)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.tensor_parallel"):
        dry_run_report(model, tp2_pp2(), 6, GLOBAL_BATCH, 1, SEQ)
    with pytest.raises(ConfigError, match="num_query_groups"):
        dry_run_report(model, ParallelConfig(tensor_parallel=16), WORLD, GLOBAL_BATCH, 1, SEQ)
    with pytest.raises(ConfigError, match="max_sequence_length"):
        dry_run_report(model, dp64(), WORLD, GLOBAL_BATCH, 1, 65_536)
    with pytest.raises(ConfigError, match="precision"):
        estimate_memory_per_gpu(model, dp64(), WORLD, 1, SEQ, "int8", False, "none")
    with pytest.raises(ConfigError, match="recompute"):
        estimate_memory_per_gpu(model, dp64(), WORLD, 1, SEQ, "bf16", False, "some")


def test_pure_arithmetic_allocates_nothing_big():
    model = conan_1p4b()
    parallel = tp2_pp2(sequence_parallel=True)
    tracemalloc.start()
    try:
        text = format_dry_run(dry_run_report(model, parallel, 4096, 4096, 1, 32_768, token_budget=3e12))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "world 4096" in text
    assert peak < 1 << 20


def test_time_and_checkpoint_figures_by_hand():
    """The 1.4B recipe on 64 GPUs at 40% MFU of 989 TFLOP/s (docs/SCALE.md checks the same by hand)."""
    from megatron_conan.training.dry_run import PlanningAssumptions, checkpoint_bytes

    assumptions = PlanningAssumptions(mfu=0.4, peak_tflops=989.0, fs_gbps=5.0)
    report = dry_run_report(conan_1p4b(), dp64(), WORLD, GLOBAL_BATCH, 1, SEQ, token_budget=3e12,
                            assumptions=assumptions, save_interval=1000)
    step_s = 10_404_516_864 * 256 * 4096 / (64 * 989e12 * 0.4)
    assert report.seconds_per_step == pytest.approx(step_s, rel=1e-12)
    assert report.days_for_budget == pytest.approx(2_861_023 * step_s / 86_400, rel=1e-12)
    assert 14.2 < report.days_for_budget < 14.3
    # bf16 weights (2) + fp32 main copy (4) + Adam m and v (8) per parameter, tied embedding once
    assert report.checkpoint_bytes == 14 * 1_499_262_464 == checkpoint_bytes(conan_1p4b(), 1, "bf16")
    assert checkpoint_bytes(conan_1p4b(), 1, "fp32") == 12 * 1_499_262_464
    assert report.checkpoint_write_seconds == pytest.approx(14 * 1_499_262_464 / 5e9)
    text = format_dry_run(report)
    assert "MFU 40% of 989 TFLOP/s per GPU" in text and "14.27 days on 64 GPUs" in text
    assert "checkpoint: 20.99 GB" in text and "every 1,000 steps: 2,861 saves" in text
    slower = dry_run_report(conan_1p4b(), dp64(), WORLD, GLOBAL_BATCH, 1, SEQ, token_budget=3e12,
                            assumptions=PlanningAssumptions(mfu=0.2))
    assert slower.days_for_budget == pytest.approx(2 * report.days_for_budget)


@pytest.mark.parametrize("fields, message", [({"mfu": 0.0}, "--mfu"), ({"mfu": 1.5}, "--mfu"),
                                             ({"peak_tflops": -1.0}, "--peak-tflops"),
                                             ({"fs_gbps": float("nan")}, "--fs-gbps")])
def test_planning_assumptions_are_checked(fields, message):
    from megatron_conan.training.dry_run import PlanningAssumptions

    with pytest.raises(ConfigError, match=message):
        PlanningAssumptions(**fields)


def test_dry_run_command_prints_days_at_the_given_mfu(capsys, monkeypatch):
    from megatron_conan.training.pretrain import main as pretrain_main

    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])
    assert pretrain_main(["--config", "examples/conan_1p4b/pretrain.yaml", "--dry-run", "--world-size", "64",
                          "--mfu", "0.5", "--fs-gbps", "10"]) == 0
    out = capsys.readouterr().out
    # 14.27 days at 40% -> 11.42 at 50%
    assert "MFU 50% of 989 TFLOP/s per GPU" in out and "11.42 days on 64 GPUs" in out
    assert "one write at 10 GB/s (--fs-gbps): 2.1 s" in out
    assert pretrain_main(["--config", "examples/conan_1p4b/pretrain.yaml", "--dry-run", "--mfu", "0"]) == 2
    assert "--mfu must be in (0, 1]" in capsys.readouterr().err


def test_local_layers_keep_what_the_cpu_allocator_measured():
    """Our own layers (no Transformer Engine) keep more than TE's: fp32 norm copies, silu(gate), the
    whole QKV output behind V. By hand for the width benchmarks/activation_memory.py measures (h 256,
    32 x 8 heads / 4 groups, f 704; 13,228 bytes a token measured there, 1% above this)."""
    import dataclasses

    model = dataclasses.replace(tiny(), hidden_size=256, num_attention_heads=8, num_query_groups=4, head_dim=32,
                                ffn_hidden_size=704)
    tokens = 2 * 256
    te = activation_bytes_per_layer(model, 2, 256, precision="bf16")
    local = activation_bytes_per_layer(model, 2, 256, precision="bf16", layers="local")
    assert te == tokens * (2 * (4 * 256 + 2 * 32 * 12 + 3 * 704) + 4 * 8) == tokens * 7840
    assert local - te == tokens * (2 * (8 * 256 - 2 * 256 + 4) + 2 * (704 + 32 * 12)) == tokens * 5256
    assert activation_bytes_per_layer(model, 2, 256, precision="bf16", recompute="full", layers="local") == \
        activation_bytes_per_layer(model, 2, 256, precision="bf16", recompute="full")
    with pytest.raises(ConfigError, match="layers must be one of"):
        activation_bytes_per_layer(model, 2, 256, layers="apex")
