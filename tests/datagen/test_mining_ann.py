"""Approximate search for mining at scale (faiss, the `ann` extra): with every cell probed it finds
what exact search finds; with the default probe it keeps most true neighbours of clustered vectors;
`auto` keeps exact search for small corpora and without faiss."""

import sys

import numpy
import pytest

from megatron_conan.datagen.mining import MiningConfig, mine_hard_negatives
from megatron_conan.errors import InputError
from megatron_conan.eval.search import ann_top_k, exact_top_k
from tests.datagen.test_mining import TableEmbedder, _examples


def _clustered(rows, dim, centres, seed):
    rng = numpy.random.default_rng(seed)
    means = rng.standard_normal((centres, dim))
    vectors = means[rng.integers(0, centres, rows)] + 0.3 * rng.standard_normal((rows, dim))
    return (vectors / numpy.linalg.norm(vectors, axis=1, keepdims=True)).astype(numpy.float32)


def test_every_cell_probed_equals_exact_search():
    pytest.importorskip("faiss")
    corpus, queries = _clustered(3000, 32, 30, 0), _clustered(50, 32, 30, 1)
    exact_scores, exact_indices = exact_top_k(queries, corpus, 20)
    scores, indices = ann_top_k(queries, corpus, 20, lists=16, probe=16)
    # fp16 storage rounds scores by ~1e-3: only near-ties may swap places
    assert numpy.abs(scores - exact_scores).max() < 2e-3
    overlap = numpy.mean([len(set(a) & set(b)) / 20 for a, b in zip(indices, exact_indices)])
    assert overlap > 0.98


def test_default_probe_keeps_most_neighbours_of_clustered_vectors():
    pytest.importorskip("faiss")
    corpus, queries = _clustered(20_000, 32, 200, 2), _clustered(200, 32, 200, 3)
    _, exact_indices = exact_top_k(queries, corpus, 10)
    _, indices = ann_top_k(queries, corpus, 10)  # 565 lists, 32 probed: 6% of the corpus scored
    recall = numpy.mean([len(set(a) & set(b)) / 10 for a, b in zip(indices, exact_indices)])
    assert recall > 0.9


def test_mining_with_the_approximate_index_matches_exact_pools(tmp_path):
    pytest.importorskip("faiss")
    embedder, examples = TableEmbedder(), _examples(40)
    corpus = [example.positive for example in examples] + [f"distractor {n}" for n in range(160)]
    exact_config = MiningConfig(num_negatives=3, pool_size=8, skip_top=2, search="exact")
    ann_config = MiningConfig(num_negatives=3, pool_size=8, skip_top=2, search="ann", ann_lists=8, ann_probe=8)
    (tmp_path / "exact").mkdir()
    (tmp_path / "ann").mkdir()
    exact_pools, exact_report = mine_hard_negatives(examples, corpus, embedder, exact_config, str(tmp_path / "exact"))
    pools, report = mine_hard_negatives(examples, corpus, embedder, ann_config, str(tmp_path / "ann"))
    assert (exact_report["search"], report["search"]) == ("exact", "ann")
    same = numpy.mean([len(set(a) & set(b)) / len(a) for a, b in zip(pools, exact_pools)])
    assert same > 0.97 and [len(pool) for pool in pools] == [len(pool) for pool in exact_pools]


def test_auto_is_exact_below_the_threshold_and_approximate_above(tmp_path):
    pytest.importorskip("faiss")
    assert MiningConfig().search_for(999_999) == "exact"
    assert MiningConfig().search_for(1_000_000) == "ann"
    assert MiningConfig(search="exact").search_for(10**9) == "exact"
    config = MiningConfig(num_negatives=2, pool_size=4, skip_top=0, ann_min_corpus=100, ann_lists=4, ann_probe=4)
    _, report = mine_hard_negatives(_examples(10), [f"text {n}" for n in range(120)], TableEmbedder(), config,
                                    str(tmp_path))
    assert report["search"] == "ann"


def test_without_faiss_ann_is_refused_and_auto_stays_exact(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(InputError, match=r"megatron_conan\[ann\]"):
        ann_top_k(numpy.ones((1, 4), numpy.float32), numpy.ones((3, 4), numpy.float32), 1)
    assert MiningConfig().search_for(5_000_000) == "exact"
    assert "install the `ann` extra" in caplog.text


@pytest.mark.parametrize("fields, message", [({"search": "fast"}, "search must be"),
                                             ({"ann_encoding": "pq"}, "ann_encoding"),
                                             ({"ann_probe": 0}, "ann_probe"), ({"ann_lists": 0}, "ann_lists")])
def test_bad_search_options_are_named(fields, message):
    with pytest.raises(InputError, match=message):
        MiningConfig(**fields)
