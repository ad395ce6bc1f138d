"""Exact top-k in blocks equals brute force."""

import numpy
import pytest
import torch

from megatron_conan.eval.search import exact_top_k


def _unit(rows, dim, seed):
    vectors = numpy.random.default_rng(seed).standard_normal((rows, dim)).astype(numpy.float32)
    return vectors / numpy.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("k,query_block,corpus_block", [(10, 7, 13), (50, 100, 16), (1, 3, 1000), (500, 16, 64)])
def test_blocked_top_k_equals_brute_force(k, query_block, corpus_block):
    queries, corpus = _unit(37, 24, 0), _unit(301, 24, 1)
    scores, indices = exact_top_k(queries, corpus, k, query_block=query_block, corpus_block=corpus_block)
    full = queries @ corpus.T  # [37, 301]
    expected = numpy.argsort(-full, axis=1, kind="stable")[:, :min(k, 301)]
    assert indices.shape == (37, min(k, 301)) and numpy.array_equal(indices, expected)
    assert numpy.allclose(scores, numpy.take_along_axis(full, expected, axis=1), atol=1e-6)


def test_corpus_read_from_a_memory_map(tmp_path):
    corpus = _unit(120, 8, 2)
    path = tmp_path / "corpus.npy"
    numpy.save(path, corpus)
    mapped = numpy.load(path, mmap_mode="r")
    queries = torch.from_numpy(_unit(5, 8, 3))
    scores, indices = exact_top_k(queries, mapped, 4, corpus_block=32)
    expected = numpy.argsort(-(queries.numpy() @ corpus.T), axis=1)[:, :4]
    assert numpy.array_equal(indices, expected)


def test_mismatched_widths_are_refused():
    with pytest.raises(ValueError, match="queries have 8 features, the corpus 9"):
        exact_top_k(_unit(2, 8, 0), _unit(3, 9, 0), 1)
