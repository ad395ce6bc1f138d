"""InfoNCE on one process against a written-out formula (fp64), and its argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_conan.losses.gather import GroupGather
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
    gathered, sizes = GroupGather()(tensor)
    assert gathered is tensor and sizes == [3]


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


def _keyed_loss(queries, positives, negatives, mask, keys, negative_keys, kept, temperature=0.05):
    """Mean over anchors of -s_ii/t + log sum_{c in kept[i]} exp(s_ic/t); candidates are numbered
    positives 0..b-1, then hard negatives b + j*k + m."""
    b = queries.shape[0]
    candidates = [positives[j] for j in range(b)]
    if negatives is not None:
        candidates += [negatives[j, m] for j in range(b) for m in range(negatives.shape[1])]
    total = 0.0
    for i in range(b):
        total += -_cos(queries[i], positives[i]) / temperature + math.log(
            sum(math.exp(_cos(queries[i], candidates[c]) / temperature) for c in kept[i]))
    return total / b


def test_duplicate_positives_are_not_negatives_and_count_once():
    """Anchors 0 and 2 share a positive text (key 7): each one's denominator leaves out the other's
    copy (a false negative), and anchors 1 and 3 score that text once (the first copy)."""
    queries, positives = _unit(4, 8, seed=21), _unit(4, 8, seed=22)
    positives[2] = positives[0]
    keys = torch.tensor([7, 8, 7, 9])
    loss, _ = infonce_loss(queries, positives, temperature=0.05, positive_keys=keys)
    kept = {0: [0, 1, 3], 1: [0, 1, 3], 2: [1, 2, 3], 3: [0, 1, 3]}  # by hand
    assert abs(float(loss) - _keyed_loss(queries, positives, None, None, keys, None, kept)) < 1e-10
    plain, _ = infonce_loss(queries, positives, temperature=0.05)
    assert float(plain) > float(loss)
    unique, _ = infonce_loss(queries, positives, temperature=0.05, positive_keys=torch.arange(4))
    assert float(unique) == float(plain)


def test_a_content_key_counts_once_in_every_denominator():
    """A hub negative (key 20, mined for rows 0, 1 and 2), a negative that is row 1's positive
    (key 11), a duplicate positive (key 10) and a padding slot with a key that occurs later (30):
    the kept candidates of each anchor, written out by hand from the rule (c is the label, or its
    key is not the anchor's positive's key and c is the first valid candidate with that key)."""
    queries, positives, negatives = _unit(3, 8, seed=31), _unit(3, 8, seed=32), _unit(3, 2, 8, seed=33)
    positives[2] = positives[0]
    negatives[1, 0] = negatives[2, 1] = negatives[0, 0]  # the hub
    negatives[2, 0] = positives[1]
    negatives[0, 1] = negatives[1, 1]  # the padded copy: masked, so it must not hide the valid one
    keys = torch.tensor([10, 11, 10])
    negative_keys = torch.tensor([[20, 30], [20, 30], [11, 20]])
    mask = torch.tensor([[True, False], [True, True], [True, True]])
    # candidates: p0 p1 p2 | n00=3 n01=4 (masked) | n10=5 n11=6 | n20=7 n21=8
    kept = {0: [0, 1, 3, 6],   # p2 is anchor 0's own text; n10, n21 the hub again; n20 = p1 again
            1: [0, 1, 3, 6],   # p2 = p0 again; n20 is anchor 1's own positive
            2: [1, 2, 3, 6]}   # p0 is anchor 2's own text; its label p2 stays
    loss, stats = infonce_loss(queries, positives, negatives, temperature=0.05, negative_mask=mask,
                               positive_keys=keys, negative_keys=negative_keys)
    expected = _keyed_loss(queries, positives, negatives, mask, keys, negative_keys, kept)
    assert abs(float(loss) - expected) < 1e-10
    candidates = torch.cat([positives, negatives.flatten(0, 1)])
    hits = [max(kept[i], key=lambda c: _cos(queries[i], candidates[c])) == i for i in range(3)]
    assert abs(float(stats["accuracy"]) - sum(hits) / 3) < 1e-12
    # without negative keys the negatives each count as their own text; positives still dedupe
    loss, _ = infonce_loss(queries, positives, negatives, temperature=0.05, negative_mask=mask,
                           positive_keys=keys)
    every_negative = [3, 5, 6, 7, 8]
    kept = {0: [0, 1] + every_negative, 1: [0, 1] + every_negative, 2: [1, 2] + every_negative}
    assert abs(float(loss) - _keyed_loss(queries, positives, negatives, mask, keys, None, kept)) < 1e-10
