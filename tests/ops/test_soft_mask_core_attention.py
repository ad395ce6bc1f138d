"""SoftMaskCoreAttention in megatron-core's [s, b, heads, dim] layout, single process."""

import pytest
import torch
import torch.nn.functional as F

from megatron_conan.ops.soft_mask_attention.schedule import SoftMaskConfig


class _SingleRankGroup:
    def size(self):
        return 1

    def rank(self):
        return 0


def _module(soft_mask=None, heads=4, groups=2, head_dim=8, **config_overrides):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_conan.ops.soft_mask_attention.core_attention import SoftMaskCoreAttention

    fields = dict(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                  num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0,
                  use_cpu_initialization=True)
    fields.update(config_overrides)
    config = TransformerConfig(**fields)
    return SoftMaskCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                 attention_type="self",
                                 pg_collection=ProcessGroupCollection(tp=_SingleRankGroup()),
                                 soft_mask=soft_mask)


def _qkv(s=12, b=2, heads=4, groups=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, groups, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, groups, head_dim, generator=g, dtype=torch.float64)
    return q, k, v


def _sdpa_sbhd(q, k, v, causal, key_pad=None):
    rep = q.shape[2] // k.shape[2]
    q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = None
    if key_pad is not None:
        mask = ~key_pad  # [b, 1, 1, s], True = attend
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    s, b = out.shape[2], out.shape[0]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def test_a0_is_causal_and_a1_is_bidirectional():
    q, k, v = _qkv()
    causal = _module(SoftMaskConfig(total_steps=10, backend="reference"))  # step 0 of a linear schedule
    torch.testing.assert_close(causal(q, k, v, None), _sdpa_sbhd(q, k, v, causal=True),
                               rtol=1e-12, atol=1e-12)
    full = _module(SoftMaskConfig.bidirectional(backend="reference"))
    torch.testing.assert_close(full(q, k, v, None), _sdpa_sbhd(q, k, v, causal=False),
                               rtol=1e-12, atol=1e-12)


def test_key_padding_mask_bidirectional():
    q, k, v = _qkv()
    key_pad = torch.zeros(2, 1, 1, 12, dtype=torch.bool)
    key_pad[1, ..., 7:] = True
    module = _module(SoftMaskConfig.bidirectional(backend="reference"))
    out = module(q, k, v, key_pad)
    expected = _sdpa_sbhd(q, k, v, causal=False, key_pad=key_pad)
    torch.testing.assert_close(out[:, 0], expected[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:7, 1], expected[:7, 1], rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(out[7:, 1]) == 0


def test_step_moves_a_and_state_roundtrips():
    from megatron_conan.ops.soft_mask_attention.core_attention import (
        get_soft_mask_state, load_soft_mask_state, set_soft_mask_step)

    config = SoftMaskConfig(schedule="quadratic", total_steps=100, backend="reference")
    model = torch.nn.ModuleList([_module(config), torch.nn.Linear(2, 2), _module(config)])
    q, k, v = _qkv()
    before = model[0](q, k, v, None)
    assert set_soft_mask_step(model, 50) == 2
    assert all(layer.a == pytest.approx(0.25) for layer in (model[0], model[2]))
    after = model[0](q, k, v, None)
    assert not torch.allclose(before, after)
    state = get_soft_mask_state(model)
    fresh = torch.nn.ModuleList([_module(config), _module(config)])
    assert load_soft_mask_state([fresh], state) == 2
    torch.testing.assert_close(fresh[0](q, k, v, None), after, rtol=0, atol=0)
    assert get_soft_mask_state(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("mask,match", [
    (torch.zeros(2, 1, 12, 12, dtype=torch.bool), "key-padding mask"),
    (torch.zeros(2, 1, 1, 12, dtype=torch.float32), "bool"),
    (torch.tensor([[False] * 11 + [True], [True] + [False] * 11]).view(2, 1, 1, 12), "right padding"),
])
def test_bad_masks_raise(mask, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        _module(SoftMaskConfig(total_steps=10, backend="reference"))(q, k, v, mask)


def test_unsupported_config_raises():
    with pytest.raises(ValueError, match="attention_dropout"):
        _module(attention_dropout=0.1)


def test_gradients_flow_in_megatron_layout():
    q, k, v = (x.requires_grad_() for x in _qkv())
    module = _module(SoftMaskConfig(fixed_a=0.3, backend="reference"))
    module(q, k, v, None).square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))
