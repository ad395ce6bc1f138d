"""The PyTorch reference against the two-call identity and SDPA (fp64, CPU)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_conan.ops.soft_mask_attention.reference import (
    soft_mask_attention_identity, soft_mask_attention_reference)
from megatron_conan.ops.soft_mask_attention.schedule import row_mask_weights


def _inputs(seed, b, hq, hkv, s, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    lengths = torch.randint(1, s + 1, (b,), generator=g, dtype=torch.int32)
    lengths[0] = s
    return q, k, v, lengths


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_identity(seed):
    g = torch.Generator().manual_seed(100 + seed)
    s = int(torch.randint(1, 70, (1,), generator=g))
    hkv = int(torch.randint(1, 3, (1,), generator=g))
    hq = hkv * int(torch.randint(1, 4, (1,), generator=g))
    d = int(torch.randint(1, 5, (1,), generator=g)) * 8
    q, k, v, lengths = _inputs(seed, 3, hq, hkv, s, d)
    a = float(torch.rand(1, generator=g))
    scale = ("len_over_pos", "pos_over_len", "none")[seed % 3]
    m = row_mask_weights(a, lengths, s, scale)
    ref = soft_mask_attention_reference(q, k, v, m, lengths)
    ident = soft_mask_attention_identity(q, k, v, m, lengths)
    torch.testing.assert_close(ref, ident, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(ref).all()


def _sdpa(q, k, v, lengths, causal):
    b, hq, s, _ = q.shape
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    pos = torch.arange(s)
    mask = pos.view(1, 1, 1, s) < lengths.long().view(-1, 1, 1, 1)
    if causal:
        mask = mask & (pos.view(1, 1, s, 1) >= pos.view(1, 1, 1, s))
    mask = mask | (pos.view(1, 1, 1, s) == 0)  # padded rows see key 0 (compared on valid rows only)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("a,causal", [(0.0, True), (1.0, False)])
@pytest.mark.parametrize("position_scale", ["len_over_pos", "none"])
def test_ends_equal_sdpa(a, causal, position_scale):
    q, k, v, lengths = _inputs(7, 2, 4, 2, 33, 16)
    lengths[1] = 20
    m = row_mask_weights(a, lengths, 33, position_scale)
    ref = soft_mask_attention_reference(q, k, v, m, lengths)
    expected = _sdpa(q, k, v, lengths, causal)
    valid = (torch.arange(33).view(1, 1, -1) < lengths.long().view(-1, 1, 1))[..., None]
    torch.testing.assert_close(torch.where(valid, ref, 0), torch.where(valid, expected, 0),
                               rtol=1e-12, atol=1e-12)


def test_padded_rows_zero_output_and_grad():
    q, k, v, lengths = _inputs(3, 2, 2, 1, 12, 8)
    lengths[1] = 5
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    m = row_mask_weights(0.4, lengths, 12)
    out = soft_mask_attention_reference(q, k, v, m, lengths)
    assert torch.equal(out[1, :, 5:], torch.zeros_like(out[1, :, 5:]))
    out.square().sum().backward()
    assert torch.equal(q.grad[1, :, 5:], torch.zeros_like(q.grad[1, :, 5:]))
    assert torch.equal(k.grad[1, :, 5:], torch.zeros_like(k.grad[1, :, 5:]))
    assert torch.equal(v.grad[1, :, 5:], torch.zeros_like(v.grad[1, :, 5:]))
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_low_precision_runs(dtype):
    q, k, v, lengths = _inputs(4, 1, 2, 2, 10, 8, dtype=dtype)
    m = row_mask_weights(0.5, lengths, 10)
    out = soft_mask_attention_reference(q, k, v, m, lengths)
    assert out.dtype == dtype
    ref = soft_mask_attention_reference(q.double(), k.double(), v.double(), m, lengths)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-2)


def test_bad_shapes_raise():
    q, k, v, lengths = _inputs(0, 2, 3, 2, 8, 8)
    with pytest.raises(ValueError, match="multiple"):
        soft_mask_attention_reference(q, k, v, torch.zeros(2, 8), lengths)
    q, k, v, lengths = _inputs(0, 2, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="m must be"):
        soft_mask_attention_reference(q, k, v, torch.zeros(2, 9), lengths)


@pytest.mark.parametrize("seed", range(4))
def test_sdpa_backend_matches_reference_with_gradients(seed):
    """The CPU backend (torch SDPA with log M as a float mask) is the reference's maths: outputs and
    q/k/v gradients equal in fp64, GQA and padded rows included."""
    from megatron_conan.ops.soft_mask_attention.reference import soft_mask_attention_sdpa

    q, k, v, lengths = _inputs(200 + seed, 3, 4, 2, 37, 16)
    m = row_mask_weights(0.1 + 0.3 * seed, lengths, 37, ("len_over_pos", "pos_over_len", "none", "len_over_pos")[seed])
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = soft_mask_attention_reference(*inputs, m, lengths)
    expected_grads = torch.autograd.grad((expected * torch.cos(expected)).sum(), inputs)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    got = soft_mask_attention_sdpa(*inputs, m, lengths)
    got_grads = torch.autograd.grad((got * torch.cos(got)).sum(), inputs)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("qkv", got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
def test_packed_texts_attend_as_if_alone(a):
    """Each text of a packed row (windows from cu_seqlens) gets the output it gets padded on its own;
    SDPA with the windows' bias gives the same."""
    from megatron_conan.ops.soft_mask_attention.reference import (
        key_windows_from_cu_seqlens, soft_mask_attention_sdpa)
    from megatron_conan.ops.soft_mask_attention.schedule import windowed_row_mask_weights

    texts, width = (5, 1, 9, 3), 20  # one row: 18 tokens and 2 of padding
    q, k, v, _ = _inputs(11, 1, 4, 2, width, 8)
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    padded_offsets = torch.tensor([0, 5, 6, 15, 20], dtype=torch.int32)
    windows = key_windows_from_cu_seqlens(cu, padded_offsets, 1, width)
    m = windowed_row_mask_weights(a, *windows)
    lengths = torch.tensor([18], dtype=torch.int32)
    packed = soft_mask_attention_reference(q, k, v, m, lengths, windows=windows)
    torch.testing.assert_close(soft_mask_attention_sdpa(q, k, v, m, lengths, windows=windows), packed,
                               rtol=1e-10, atol=1e-10)
    for start, length in zip(cu[:-1].tolist(), texts):
        part = slice(start, start + length)
        alone_len = torch.tensor([length], dtype=torch.int32)
        alone = soft_mask_attention_reference(q[:, :, part], k[:, :, part], v[:, :, part],
                                              row_mask_weights(a, alone_len, length), alone_len)
        torch.testing.assert_close(packed[:, :, part], alone, rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(packed[:, :, 18:]) == 0
