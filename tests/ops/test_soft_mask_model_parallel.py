"""The tiny Conan model with the soft-mask core attention: TP=2 equals TP=1, a = 0 equals the causal
model and a = 1 the bidirectional one (megatron-core's DotProductAttention), on padded batches."""

import pytest
import torch

from megatron_conan.testing.distributed import run_distributed

BATCH, SEQ = 2, 24
LENGTHS = (24, 15)
A_VALUES = (0.0, 0.35, 1.0)
TOL = 1e-5


def _batch(vocab_size):
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ + 1), generator=g)
    pos = torch.arange(SEQ)
    key_pad = pos.view(1, SEQ) >= torch.tensor(LENGTHS).view(BATCH, 1)  # [b, s], True = padded
    return {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": pos.expand(BATCH, SEQ).contiguous(),
        "key_pad": key_pad.view(BATCH, 1, 1, SEQ),
        "loss_mask": (~key_pad).float(),
    }


def _loss_and_grads(model, batch, attention_mask, model_config):
    from megatron_conan.models.sharding import gather_full_state_dict

    per_token = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=attention_mask, labels=batch["labels"])  # [b, s]
    loss = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    return float(loss), gather_full_state_dict([model], model_config, source="grad")


def _body(rank, world_size, tensor_parallel, full_weights):
    from megatron_conan.config.model import ParallelConfig, tiny
    from megatron_conan.models.transformer_config import build_transformer_config
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.models.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_conan.ops.soft_mask_attention import SoftMaskConfig
    from megatron_conan.ops.soft_mask_attention.core_attention import (
        set_soft_mask_step, soft_mask_core_attention_spec)

    parallel = ParallelConfig(tensor_parallel=tensor_parallel)
    initialize_model_parallel(parallel, seed=1234)
    model_config = tiny()
    transformer_config = build_transformer_config(model_config, parallel)
    batch = _batch(model_config.vocab_size)
    results = {}

    def build(core_attention=None):
        (model,) = build_model_chunks(model_config, transformer_config, core_attention=core_attention,
                                      use_transformer_engine=False)
        if full_weights is not None:
            load_full_state_dict([model], full_weights, model_config)
        return model

    # a(t) moved by the trainer: linear schedule over 100 steps, step = 100 a
    spec = soft_mask_core_attention_spec(SoftMaskConfig(total_steps=100, backend="reference"))
    for a in A_VALUES:
        model = build(spec)
        if full_weights is None:
            full_weights = gather_full_state_dict([model], model_config)
            results["weights"] = full_weights
        assert set_soft_mask_step(model, round(100 * a)) == model_config.num_layers
        results[("soft", a)] = _loss_and_grads(model, batch, batch["key_pad"], model_config)
    # megatron-core's own attention: causal (no mask) and bidirectional (key-padding mask)
    no_padding = {**batch, "loss_mask": torch.ones(BATCH, SEQ)}
    results["dpa_causal"] = _loss_and_grads(build(), no_padding, None, model_config)
    results["soft_causal_unpadded"] = _loss_and_grads(
        build(soft_mask_core_attention_spec(SoftMaskConfig.causal(backend="reference"))),
        no_padding, None, model_config)
    results["dpa_bidirectional"] = _loss_and_grads(build(), batch, batch["key_pad"], model_config)
    return results


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs():
    tp1 = run_distributed(_body, 1, args=(1, None))[0]
    tp2 = run_distributed(_body, 2, args=(2, tp1["weights"]))
    return tp1, tp2


def test_tp2_equals_tp1(runs):
    tp1, tp2 = runs
    for a in A_VALUES:
        loss1, grads1 = tp1[("soft", a)]
        for rank_result in tp2:
            loss2, grads2 = rank_result[("soft", a)]
            assert abs(loss1 - loss2) < TOL, (a, loss1, loss2)
            assert _max_diff(grads1, grads2) < TOL, a


def test_a_moves_the_model(runs):
    tp1, _ = runs
    losses = [tp1[("soft", a)][0] for a in A_VALUES]
    assert len(set(losses)) == len(losses)


def test_ends_equal_megatron_attention(runs):
    tp1, tp2 = runs
    for result in (tp1, tp2[0]):
        # a = 0: the causal model (unpadded batch, where DotProductAttention is causal)
        loss_soft, grads_soft = result["soft_causal_unpadded"]
        loss_dpa, grads_dpa = result["dpa_causal"]
        assert abs(loss_soft - loss_dpa) < TOL and _max_diff(grads_soft, grads_dpa) < TOL
        # a = 1 with padding: bidirectional attention over the real tokens
        loss_soft, grads_soft = result[("soft", 1.0)]
        loss_dpa, grads_dpa = result["dpa_bidirectional"]
        assert abs(loss_soft - loss_dpa) < TOL and _max_diff(grads_soft, grads_dpa) < TOL
