"""Matryoshka loss equals the sum of separate loss calls on truncated, re-normalised prefixes."""

import pytest
import torch
import torch.nn.functional as F

from megatron_conan.losses.cosent import CoSENTLoss, cosent_loss
from megatron_conan.losses.infonce import InfoNCELoss
from megatron_conan.losses.matryoshka import DEFAULT_DIMS, MatryoshkaLoss, matryoshka_dims
from megatron_conan.losses.targets import LossTargets


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
    inner = InfoNCELoss(temperature=0.05)
    weights = {4: 0.5, 12: 2.0}
    total, stats = MatryoshkaLoss(inner, dims=(4, 8, 16), weights=weights)(embeddings, LossTargets())
    assert sorted(name for name in stats if name.startswith("loss_dim_")) == ["loss_dim_12", "loss_dim_4",
                                                                              "loss_dim_8"]  # 16 > width dropped
    expected = 0.0
    for dim in (4, 8, 12):
        prefixes = {role: F.normalize(tensor[..., :dim], dim=-1) for role, tensor in embeddings.items()}
        separate, separate_stats = inner(prefixes, LossTargets())
        assert abs(float(stats[f"loss_dim_{dim}"]) - float(separate)) < 1e-12
        expected += weights.get(dim, 1.0) * float(separate)
    # the statistics are the full width's
    torch.testing.assert_close(stats["hard_negative_cosines"], separate_stats["hard_negative_cosines"])
    assert abs(float(total) - expected) < 1e-12


def test_wraps_any_loss_of_the_shape():
    generator = torch.Generator().manual_seed(1)
    emb1, emb2 = (torch.randn(5, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    targets = LossTargets(scores=torch.arange(5, dtype=torch.float64))
    total, stats = MatryoshkaLoss(CoSENTLoss(scale=20.0), dims=(3,))({"queries": emb1, "positives": emb2}, targets)
    assert int(stats["num_anchors"]) == 5 and {"loss_dim_3", "loss_dim_6"} <= set(stats)
    expected = (float(cosent_loss(emb1[:, :3], emb2[:, :3], targets.scores))
                + float(cosent_loss(emb1, emb2, targets.scores)))
    assert abs(float(total) - expected) < 1e-12


def test_widths_must_agree():
    embeddings = _embeddings(width=8)
    embeddings["positives"] = embeddings["positives"][:, :6]
    with pytest.raises(ValueError, match="same width"):
        MatryoshkaLoss(InfoNCELoss())(embeddings, LossTargets())
    with pytest.raises(ValueError, match="at least one"):
        MatryoshkaLoss(InfoNCELoss())({}, LossTargets())
