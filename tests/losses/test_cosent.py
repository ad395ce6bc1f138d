"""CoSENT against the written-out pair sum, its invariances and the direction of its gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_conan.losses.cosent import cosent_from_similarities, cosent_loss


def _pairs(seed, b=6, d=8):
    generator = torch.Generator().manual_seed(seed)
    emb1 = torch.randn(b, d, generator=generator, dtype=torch.float64)
    emb2 = torch.randn(b, d, generator=generator, dtype=torch.float64)
    scores = torch.tensor([0.0, 1.5, 3.0, 1.5, 5.0, 4.2], dtype=torch.float64)[:b]  # one tie
    return emb1, emb2, scores


def _brute_force(emb1, emb2, scores, scale):
    b = emb1.shape[0]
    cosines = [float(F.cosine_similarity(emb1[i], emb2[i], dim=0)) for i in range(b)]
    pair_sum = sum(math.exp(scale * (cosines[j] - cosines[i]))
                   for i in range(b) for j in range(b) if scores[i] > scores[j])
    return math.log(1.0 + pair_sum)


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_matches_written_out_pair_sum(scale):
    emb1, emb2, scores = _pairs(seed=0)
    assert abs(float(cosent_loss(emb1, emb2, scores, scale=scale))
               - _brute_force(emb1, emb2, scores, scale)) < 1e-10


def test_invariant_to_batch_order_and_embedding_norms():
    emb1, emb2, scores = _pairs(seed=1)
    loss = float(cosent_loss(emb1, emb2, scores))
    order = torch.randperm(emb1.shape[0], generator=torch.Generator().manual_seed(0))
    assert abs(float(cosent_loss(emb1[order], emb2[order], scores[order])) - loss) < 1e-10
    assert abs(float(cosent_loss(2.0 * emb1, 0.3 * emb2, scores)) - loss) < 1e-10


def test_stable_for_large_scale_and_zero_without_ordered_pairs():
    similarities = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    loss = cosent_from_similarities(similarities, torch.tensor([0.0, 1.0, 2.0]), scale=1000.0)
    assert torch.isfinite(loss) and abs(float(loss) - 2000.0) < 1e-6  # log(sum) ~ largest term
    tied = cosent_from_similarities(similarities, torch.ones(3), scale=20.0)
    assert float(tied) == 0.0
    assert float(cosent_from_similarities(similarities[:0], torch.ones(0))) == 0.0


def test_gradient_raises_the_gold_higher_pair():
    similarities = torch.tensor([0.2, 0.6, 0.4], dtype=torch.float64, requires_grad=True)
    scores = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)  # gold: 0 > 2 > 1
    (grad,) = torch.autograd.grad(cosent_from_similarities(similarities, scores), similarities)
    # descending the loss raises cos of the top pair and lowers cos of the bottom one
    assert grad[0] < 0 and grad[1] > 0
    assert abs(float(grad.sum())) < 1e-12  # only differences of cosines matter


def test_a_gradient_step_lowers_the_loss():
    emb1, emb2, scores = _pairs(seed=2)
    emb1.requires_grad_(True)
    loss = cosent_loss(emb1, emb2, scores)
    (grad,) = torch.autograd.grad(loss, emb1)
    assert float(cosent_loss(emb1.detach() - 1e-3 * grad, emb2, scores)) < loss.item()


def test_shape_errors():
    with pytest.raises(ValueError, match="emb1 and emb2"):
        cosent_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="similarities and scores"):
        cosent_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2))
