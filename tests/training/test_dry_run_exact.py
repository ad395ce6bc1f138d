"""The dry run's per-rank parameter, gradient-buffer and optimizer bytes equal what megatron-core
allocates, and its FLOPs per token match torch's FLOP counter, on built models (one 4-rank gloo world)."""

import dataclasses
import logging

import pytest

from megatron_conan.config.model import ConanModelConfig, ParallelConfig
from megatron_conan.testing.distributed import run_distributed
from megatron_conan.testing.state_bytes import StateLayout, layout_state_body
from megatron_conan.training.dry_run import (
    gradient_buckets,
    model_flops_per_token,
    stage_parameter_shapes,
    stage_parameters,
    state_bytes_per_rank,
)

WORLD = 4
# Widths that are not multiples of 64 (norms of 40 elements) or 128 (vocab 300), so that the
# distributed optimizer's padding and the TP vocabulary padding both show.
MODEL = ConanModelConfig(num_layers=4, hidden_size=40, num_attention_heads=4, num_query_groups=2, head_dim=10,
                         ffn_hidden_size=72, vocab_size=300, max_sequence_length=64)
LAYOUTS = [
    StateLayout(ParallelConfig(), "bf16"),                                                    # DP4
    StateLayout(ParallelConfig(use_distributed_optimizer=True), "bf16"),                      # DP4 + DistOpt
    StateLayout(ParallelConfig(tensor_parallel=2, sequence_parallel=True,
                               use_distributed_optimizer=True), "bf16"),                      # TP2 x DP2 + SP
    StateLayout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2,
                               use_distributed_optimizer=True), "bf16"),                      # TP2 x PP2
    StateLayout(ParallelConfig(pipeline_parallel=2, use_distributed_optimizer=True), "bf16"),  # PP2 x DP2
    StateLayout(ParallelConfig(pipeline_parallel=4), "fp32"),                                 # PP4, fp32
    StateLayout(ParallelConfig(use_distributed_optimizer=True), "fp32",
                {"tie_embeddings": False}),                                                   # untied, fp32
]
FLOPS_SHAPE = (2, 64)
FLOPS_MODEL = dataclasses.replace(MODEL, vocab_size=384)  # a multiple of 128: no padding rows to count


@pytest.fixture(scope="module")
def world():
    flops_layout = StateLayout(ParallelConfig(), "fp32", {"vocab_size": FLOPS_MODEL.vocab_size})
    return run_distributed(layout_state_body, WORLD, args=(MODEL, [flops_layout] + LAYOUTS, FLOPS_SHAPE),
                           timeout_s=600, log_level=logging.WARNING)


def _name(layout: StateLayout) -> str:
    par = layout.parallel
    return (f"TP{par.tensor_parallel}xPP{par.pipeline_parallel}{'+SP' if par.sequence_parallel else ''}"
            f"{'+DistOpt' if par.use_distributed_optimizer else ''} {layout.precision} {layout.model_overrides}")


def test_state_bytes_equal_megatron_core_on_every_rank(world):
    checked = 0
    for index, layout in enumerate(LAYOUTS, start=1):
        model = dataclasses.replace(MODEL, **layout.model_overrides)
        for rank in range(WORLD):
            measured = world[rank]["measured"][index]
            predicted = state_bytes_per_rank(model, layout.parallel, WORLD, rank, layout.precision)
            stage = rank // (WORLD // layout.parallel.pipeline_parallel)
            assert measured["parameters"] == stage_parameters(model, layout.parallel)[stage], (_name(layout), rank)
            for key in ("weights", "gradients", "optimizer"):
                assert measured[key] == predicted[key], (_name(layout), rank, key, measured, predicted)
            checked += 1
    assert checked == WORLD * len(LAYOUTS)


def test_distributed_optimizer_padding_is_exercised():
    """The layouts above are not trivially aligned: the padded buffer is larger than the parameters."""
    parallel = ParallelConfig(use_distributed_optimizer=True)
    shapes = stage_parameter_shapes(MODEL, parallel, 0)
    buckets = gradient_buckets(shapes, WORLD, True)
    assert buckets[-1][1] > sum(shape.numel for shape in shapes)
    assert all((end - start) % WORLD == 0 for start, end, _ in buckets)
    pipelined = stage_parameter_shapes(MODEL, ParallelConfig(pipeline_parallel=2), 1)
    assert pipelined[-1].name == "output_layer.weight" and pipelined[-1].shared_embedding
    assert len(gradient_buckets(pipelined, 2, True)) == 2  # the tied copy in a bucket of its own


def test_flops_per_token_within_two_percent_of_the_counter(world):
    batch, seq_length = FLOPS_SHAPE
    counted = world[0]["flops"]
    predicted = model_flops_per_token(FLOPS_MODEL, seq_length) * batch * seq_length
    # The counter sees the matmuls (and the attention's two batched products, counted in full
    # for the causal mask as the formula does); the formula adds the norm weights' 6 FLOPs each.
    assert counted == pytest.approx(predicted, rel=0.02), (counted, predicted)
