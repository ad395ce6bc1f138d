"""InfoNCE on one process against a written-out formula (fp64), and its argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_conan.losses.gather import all_gather_with_grad
from megatron_conan.losses.infonce import infonce_loss


def _unit(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def _cos(a, b):
    return float((a * b).sum())


def _brute_force(queries, positives, negatives, mask, temperature, in_batch):
    """Mean over anchors of -log(exp(s_ii) / sum over the anchor's candidates of exp(s))."""
    b = queries.shape[0]
    k = 0 if negatives is None else negatives.shape[1]
    total = 0.0
    for i in range(b):
        def score(candidate):
            return math.exp(_cos(queries[i], candidate) / temperature)

        numerator = score(positives[i])
        if in_batch:
            denominator = sum(score(positives[j]) for j in range(b))
            denominator += sum(score(negatives[j, m]) for j in range(b) for m in range(k)
                               if mask[j, m])
        else:
            denominator = numerator + sum(score(negatives[i, m]) for m in range(k) if mask[i, m])
        total += -math.log(numerator / denominator)
    return total / b


@pytest.mark.parametrize("with_negatives", [False, True])
def test_in_batch_matches_written_out_formula(with_negatives):
    b, k, d, temperature = 5, 3, 16, 0.05
    queries, positives = _unit(b, d, seed=0), _unit(b, d, seed=1)
    negatives = _unit(b, k, d, seed=2) if with_negatives else None
    mask = torch.ones(b, k, dtype=torch.bool)
    loss, stats = infonce_loss(queries, positives, negatives, temperature=temperature)
    expected = _brute_force(queries, positives, negatives, mask, temperature, in_batch=True)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected) < 1e-10
    assert float(stats["loss"]) == float(loss)
    mean_positive_cosine = float((queries * positives).sum(-1).mean())
    assert abs(float(stats["positive_cosine"]) - mean_positive_cosine) < 1e-12
    if with_negatives:
        cosines = torch.tensor([[_cos(queries[i], negatives[i, m]) for m in range(k)]
                                for i in range(b)], dtype=torch.float64)
        torch.testing.assert_close(stats["hard_negative_cosines"], cosines, rtol=0, atol=1e-12)
        assert abs(float(stats["hard_negative_cosine"]) - float(cosines.mean())) < 1e-12
        assert not stats["hard_negative_cosines"].requires_grad


def test_masked_negatives_are_never_scored():
    b, k, d, temperature = 4, 3, 8, 0.1
    queries, positives, negatives = _unit(b, d, seed=3), _unit(b, d, seed=4), _unit(b, k, d, seed=5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    negatives.requires_grad_(True)
    for in_batch in (True, False):
        loss, stats = infonce_loss(queries, positives, negatives, temperature=temperature,
                                   in_batch_negatives=in_batch, negative_mask=mask)
        expected = _brute_force(queries, positives, negatives.detach(), mask, temperature, in_batch)
        assert abs(loss.item() - expected) < 1e-10
        (grad,) = torch.autograd.grad(loss, negatives)
        assert torch.all(grad[~mask] == 0) and torch.all(grad[mask].abs().sum(-1) > 0)
        valid = stats["hard_negative_cosines"][mask]
        assert abs(float(stats["hard_negative_cosine"]) - float(valid.mean())) < 1e-12


def test_classification_variant_scores_only_own_candidates():
    b, k, d, temperature = 6, 2, 8, 0.02
    queries, positives, negatives = _unit(b, d, seed=6), _unit(b, d, seed=7), _unit(b, k, d, seed=8)
    mask = torch.ones(b, k, dtype=torch.bool)
    loss, _ = infonce_loss(queries, positives, negatives, temperature=temperature,
                           in_batch_negatives=False)
    expected = _brute_force(queries, positives, negatives, mask, temperature, in_batch=False)
    assert abs(loss.item() - expected) < 1e-10
    in_batch, _ = infonce_loss(queries, positives, negatives, temperature=temperature)
    assert float(in_batch) > float(loss)  # more candidates in every denominator
    # each example on its own gives the same loss: nothing of another example is scored
    alone = [infonce_loss(queries[i:i + 1], positives[i:i + 1], negatives[i:i + 1],
                          temperature=temperature, in_batch_negatives=False)[0] for i in range(b)]
    assert abs(float(loss) - float(sum(alone)) / b) < 1e-10

def test_inputs_are_normalised_and_low_precision_is_promoted():
    b, d = 4, 8
    queries, positives = _unit(b, d, seed=10), _unit(b, d, seed=11)
    reference, _ = infonce_loss(queries, positives)
    scaled, _ = infonce_loss(3.0 * queries, 0.5 * positives)
    assert abs(float(reference) - float(scaled)) < 1e-10
    half, _ = infonce_loss(queries.to(torch.bfloat16), positives.to(torch.bfloat16))
    assert half.dtype == torch.float32


def test_accuracy_counts_anchors_whose_positive_wins():
    queries = torch.eye(3, dtype=torch.float64)
    positives = torch.eye(3, dtype=torch.float64)[[0, 2, 1]]  # only anchor 0 matches its positive
    _, stats = infonce_loss(queries, positives)
    assert abs(float(stats["accuracy"]) - 1 / 3) < 1e-12


def test_gather_without_distributed_is_identity():
    tensor = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(tensor) is tensor


@pytest.mark.parametrize("kwargs, message", [
    (dict(positives=torch.zeros(3, 4)), "queries and positives"),
    (dict(hard_negatives=torch.zeros(3, 1, 4)), "hard_negatives must be"),
    (dict(hard_negatives=torch.zeros(2, 1, 4), negative_mask=torch.ones(2, 2, dtype=torch.bool)),
     "negative_mask must be"),
    (dict(negative_mask=torch.ones(2, 1, dtype=torch.bool)), "without hard_negatives"),
    (dict(in_batch_negatives=False), "hard_negatives are required"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_arguments_are_refused(kwargs, message):
    arguments = dict(queries=torch.zeros(2, 4), positives=torch.zeros(2, 4))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        infonce_loss(**arguments)


def test_duplicate_positives_are_not_negatives():
    """Anchors 0 and 2 share a positive text: with keys, each one's denominator leaves out the
    other's copy (a false negative), and nothing else changes."""
    queries, positives = _unit(4, 8, seed=21), _unit(4, 8, seed=22)
    positives[2] = positives[0]
    keys = torch.tensor([7, 8, 7, 9])
    loss, _ = infonce_loss(queries, positives, temperature=0.05, positive_keys=keys)
    expected = 0.0
    for i in range(4):
        logits = [(_cos(queries[i], positives[j]) / 0.05) for j in range(4) if j == i or keys[j] != keys[i]]
        own = _cos(queries[i], positives[i]) / 0.05
        expected += -own + math.log(sum(math.exp(v) for v in logits))
    assert abs(float(loss) - expected / 4) < 1e-10
    plain, _ = infonce_loss(queries, positives, temperature=0.05)
    assert float(plain) > float(loss)
    unique, _ = infonce_loss(queries, positives, temperature=0.05, positive_keys=torch.arange(4))
    assert float(unique) == float(plain)


def test_a_hard_negative_equal_to_a_queries_own_positive_is_left_out():
    """Query 1's mined negative 0 is query 0's positive: with keys it leaves query 0's denominator
    (where it would be a copy of its own positive), and stays a negative for query 1."""
    queries, positives, negatives = _unit(2, 8, seed=31), _unit(2, 8, seed=32), _unit(2, 2, 8, seed=33)
    negatives[1, 0] = positives[0]
    mask = torch.ones(2, 2, dtype=torch.bool)
    keys, negative_keys = torch.tensor([10, 11]), torch.tensor([[20, 21], [10, 22]])
    loss, _ = infonce_loss(queries, positives, negatives, temperature=0.05, negative_mask=mask,
                           positive_keys=keys, negative_keys=negative_keys)
    reduced = mask.clone()
    expected = 0.0
    for i in range(2):
        kept = [(j, m) for j in range(2) for m in range(2) if not (negative_keys[j, m] == keys[i])]
        logits = [_cos(queries[i], positives[j]) / 0.05 for j in range(2)]
        logits += [_cos(queries[i], negatives[j, m]) / 0.05 for j, m in kept]
        expected += -_cos(queries[i], positives[i]) / 0.05 + math.log(sum(math.exp(v) for v in logits))
    assert abs(float(loss) - expected / 2) < 1e-10
    plain, _ = infonce_loss(queries, positives, negatives, temperature=0.05, negative_mask=reduced)
    assert float(plain) > float(loss)
