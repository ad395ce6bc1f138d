"""The key map on the full-size model (meta device) and its two reshapes on real numbers."""

import pytest
import torch

from megatron_conan.config.model import conan_1p4b, tiny
from megatron_conan.conversion import keymap
from megatron_conan.conversion.hf_config import hf_config_dict


def _hf_meta_parameters(config_values):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config_values))
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def test_1p4b_key_map_maps_every_tensor_both_ways_on_meta(artifacts):
    cfg = conan_1p4b()
    megatron = dict(artifacts["conan_1p4b_meta"])  # the real megatron-core model's parameters
    # the full state dict holds vocab_size rows (the model pads for TP) and no tied output layer
    megatron["embedding.word_embeddings.weight"] = (cfg.vocab_size, cfg.hidden_size)
    assert megatron == keymap.megatron_shapes(cfg)
    hf_expected = _hf_meta_parameters(hf_config_dict(cfg))
    assert sum(torch.Size(shape).numel() for shape in hf_expected.values()) == 1_499_205_120

    megatron_meta = {key: torch.empty(shape, device="meta") for key, shape in megatron.items()}
    hf = keymap.megatron_to_hf(megatron_meta, cfg)
    assert {key: tuple(tensor.shape) for key, tensor in hf.items()} == hf_expected  # all mapped, no leftover

    back = keymap.hf_to_megatron({key: torch.empty(shape, device="meta") for key, shape in hf_expected.items()}, cfg)
    assert {key: tuple(tensor.shape) for key, tensor in back.items()} == megatron


def test_reshapes_are_inverse_and_split_heads_by_group():
    cfg = tiny()  # 8 query heads over 4 KV groups, head dim 8
    groups, per_group, d, h = cfg.num_query_groups, 2, cfg.head_dim, cfg.hidden_size
    qkv = torch.randn((groups * (per_group + 2) * d, h), generator=torch.Generator().manual_seed(0))
    q, k, v = keymap.split_qkv(qkv, cfg)
    grouped = qkv.view(groups, per_group + 2, d, h)
    assert torch.equal(q[d:2 * d], grouped[0, 1])  # query head 1 is the 2nd head of group 0
    assert torch.equal(q[2 * d:3 * d], grouped[1, 0])  # query head 2 opens group 1
    assert torch.equal(k[d:2 * d], grouped[1, per_group]) and torch.equal(v[:d], grouped[0, per_group + 1])
    assert torch.equal(keymap.merge_qkv(q, k, v, cfg), qkv)
    fc1 = torch.randn(2 * cfg.ffn_hidden_size, h)
    assert torch.equal(keymap.merge_gate_up(*keymap.split_gate_up(fc1, cfg), cfg), fc1)


def test_a_leftover_or_misshaped_tensor_is_an_error(artifacts):
    cfg = tiny()
    full = dict(artifacts["full_state_dict"])
    with pytest.raises(keymap.ConversionError, match="does not know: decoder.layers.9.extra"):
        keymap.megatron_to_hf({**full, "decoder.layers.9.extra": torch.zeros(1)}, cfg)
    hf = keymap.megatron_to_hf(full, cfg)
    hf["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(keymap.ConversionError, match=r"model.layers.0.mlp.up_proj.weight has shape \(3, 3\)"):
        keymap.hf_to_megatron(hf, cfg)
    del hf["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(keymap.ConversionError, match="no tensor model.layers.0.mlp.up_proj.weight"):
        keymap.hf_to_megatron(hf, cfg)
