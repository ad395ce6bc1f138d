"""Matryoshka loss equals the sum of separate loss calls on truncated, re-normalised prefixes."""

import functools

import pytest
import torch
import torch.nn.functional as F

from megatron_conan.losses.cosent import cosent_loss
from megatron_conan.losses.infonce import infonce_loss
from megatron_conan.losses.matryoshka import DEFAULT_DIMS, matryoshka_dims, matryoshka_loss


def _embeddings(width, seed=0, b=4, k=2):
    generator = torch.Generator().manual_seed(seed)
    return {
        "queries": torch.randn(b, width, generator=generator, dtype=torch.float64),
        "positives": torch.randn(b, width, generator=generator, dtype=torch.float64),
        "hard_negatives": torch.randn(b, k, width, generator=generator, dtype=torch.float64),
    }


def test_dims_drop_wider_than_width_and_always_include_width():
    assert matryoshka_dims(3584) == list(DEFAULT_DIMS)
    assert matryoshka_dims(4096) == list(DEFAULT_DIMS) + [4096]
    assert matryoshka_dims(1000) == [256, 512, 1000]
    assert matryoshka_dims(64) == [64]
    with pytest.raises(ValueError, match="positive"):
        matryoshka_dims(64, dims=(0, 32))


def test_equals_weighted_sum_of_separate_calls():
    embeddings = _embeddings(width=12)
    loss_fn = functools.partial(infonce_loss, temperature=0.05)
    weights = {4: 0.5, 12: 2.0}
    result = matryoshka_loss(loss_fn, embeddings, dims=(4, 8, 16), weights=weights)
    assert list(result.per_dim) == [4, 8, 12]  # 16 > width dropped, the width added
    expected = 0.0
    for dim in (4, 8, 12):
        prefixes = {role: F.normalize(tensor[..., :dim], dim=-1)
                    for role, tensor in embeddings.items()}
        separate, stats = loss_fn(**prefixes)
        assert abs(float(result.per_dim[dim]) - float(separate)) < 1e-12
        torch.testing.assert_close(result.stats[dim]["hard_negative_cosines"],
                                   stats["hard_negative_cosines"])
        expected += weights.get(dim, 1.0) * float(separate)
    assert abs(float(result.total) - expected) < 1e-12


def test_bare_tensor_losses_and_none_roles_pass_through():
    generator = torch.Generator().manual_seed(1)
    emb1, emb2 = (torch.randn(5, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    scores = torch.arange(5, dtype=torch.float64)

    def loss_fn(emb1, emb2, unused):
        assert unused is None
        return cosent_loss(emb1, emb2, scores)

    result = matryoshka_loss(loss_fn, {"emb1": emb1, "emb2": emb2, "unused": None}, dims=(3,))
    assert list(result.per_dim) == [3, 6] and result.stats == {3: {}, 6: {}}
    expected = (float(cosent_loss(emb1[:, :3], emb2[:, :3], scores))
                + float(cosent_loss(emb1, emb2, scores)))
    assert abs(float(result.total) - expected) < 1e-12


def test_widths_must_agree():
    embeddings = _embeddings(width=8)
    embeddings["positives"] = embeddings["positives"][:, :6]
    with pytest.raises(ValueError, match="same width"):
        matryoshka_loss(infonce_loss, embeddings)
    with pytest.raises(ValueError, match="at least one"):
        matryoshka_loss(infonce_loss, {"hard_negatives": None})
