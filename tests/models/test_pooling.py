"""Pooling of [s, b, h] hidden states: padding ignored, the right positions picked, normalised."""

import pytest
import torch

from megatron_conan.models.pooling import pool

LENGTHS = torch.tensor([3, 1, 5])


def _hidden(seq_len=5, batch=3, width=4):
    hidden = torch.randn(seq_len, batch, width, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    for column, length in enumerate(LENGTHS.tolist()):
        hidden[length:, column] = 1e6  # padding that must not leak into any mode
    return hidden


def test_mean_ignores_padding():
    hidden = _hidden()
    pooled = pool(hidden, LENGTHS, "mean", normalize=False)
    expected = torch.stack([hidden[:length, column].mean(0)
                            for column, length in enumerate(LENGTHS.tolist())])
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)


def test_last_takes_position_length_minus_one_and_first_position_zero():
    hidden = _hidden()
    last = pool(hidden, LENGTHS, "last", normalize=False)
    torch.testing.assert_close(last, torch.stack([hidden[2, 0], hidden[0, 1], hidden[4, 2]]))
    torch.testing.assert_close(pool(hidden, LENGTHS, "first", normalize=False), hidden[0])


@pytest.mark.parametrize("mode", ["mean", "last", "first"])
def test_normalised_by_default(mode):
    hidden = _hidden()
    pooled = pool(hidden, LENGTHS, mode)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    raw = pool(hidden, LENGTHS, mode, normalize=False)
    torch.testing.assert_close(pooled, raw / raw.norm(dim=-1, keepdim=True))


def test_half_precision_pools_in_float32_and_gradient_skips_padding():
    hidden = _hidden().to(torch.bfloat16)
    assert pool(hidden, LENGTHS).dtype == torch.float32
    hidden = _hidden().requires_grad_(True)
    pool(hidden, LENGTHS).sum().backward()
    for column, length in enumerate(LENGTHS.tolist()):
        assert torch.all(hidden.grad[length:, column] == 0)


@pytest.mark.parametrize("mode, lengths, message", [
    ("max", LENGTHS, "pooling mode"),
    ("mean", torch.tensor([3, 0, 5]), r"lengths must lie in \[1, 5\]"),
    ("last", torch.tensor([3, 1, 6]), r"lengths must lie in \[1, 5\]"),
    ("mean", torch.tensor([3, 1]), "integer"),
    ("mean", torch.tensor([3.0, 1.0, 5.0]), "integer"),
])
def test_bad_modes_and_lengths_are_refused(mode, lengths, message):
    with pytest.raises(ValueError, match=message):
        pool(_hidden(), lengths, mode)


def test_hidden_must_be_three_dimensional():
    with pytest.raises(ValueError, match=r"\[s, b, h\]"):
        pool(torch.zeros(5, 3), LENGTHS)


def test_starts_leave_a_prompt_out_of_mean_and_first_pooling():
    import torch

    from megatron_conan.models.pooling import pool

    hidden = torch.randn(6, 3, 4, dtype=torch.float64)  # [s, b, h]
    lengths = torch.tensor([6, 4, 2])
    starts = torch.tensor([2, 0, 5])  # the last is clamped to length - 1: its last token
    mean = pool(hidden, lengths, "mean", normalize=False, starts=starts)
    assert torch.allclose(mean[0], hidden[2:6, 0].mean(0))
    assert torch.allclose(mean[1], hidden[0:4, 1].mean(0))
    assert torch.allclose(mean[2], hidden[1, 2])
    first = pool(hidden, lengths, "first", normalize=False, starts=starts)
    assert torch.allclose(first, torch.stack([hidden[2, 0], hidden[0, 1], hidden[1, 2]]))
    last = pool(hidden, lengths, "last", normalize=False, starts=starts)
    assert torch.allclose(last, pool(hidden, lengths, "last", normalize=False))
