"""Retrieval evaluation of an embedder, and BM25 / random baselines, on a BEIR-layout split.

    dataset = load_beir("data/scifact", "test")
    report = evaluate_embedder(embedder, dataset, dim=512)      # {"ndcg_at_10": ..., ...}

The embedder encodes queries with its ``query`` prompt and documents with its ``document`` prompt;
the search is exact (:func:`megatron_conan.eval.search.exact_top_k`) and the metrics are
``pytrec_eval``'s (:mod:`megatron_conan.eval.metrics`). BM25 is ``bm25s`` (Lucene's BM25 variant,
k1 = 1.5, b = 0.75, lower-cased word tokens, no stemming or stop words so that it treats every
language alike); random draws each query's ranking from a seeded generator.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import numpy

from megatron_conan.eval.beir import RetrievalDataset
from megatron_conan.eval.metrics import retrieval_metrics
from megatron_conan.eval.search import exact_top_k

logger = logging.getLogger(__name__)

BASELINES = ("bm25", "random")
DEFAULT_TOP_K = 100
"""Documents kept per query: the deepest cut of the reported metrics."""

Run = Dict[str, Dict[str, float]]


def run_from_top_k(dataset: RetrievalDataset, scores: numpy.ndarray, indices: numpy.ndarray) -> Run:
    """A run from a search's [queries, k] scores and document indices, rows in the dataset's query
    order (for callers that search vectors they embedded themselves)."""
    return {query: {dataset.doc_ids[int(index)]: float(score) for score, index in zip(row_scores, row_indices)}
            for query, row_scores, row_indices in zip(dataset.query_ids, scores, indices)}


def embedder_run(embedder, dataset: RetrievalDataset, dim: Optional[int] = None, top_k: int = DEFAULT_TOP_K,
                 batch_size: int = 32, show_progress: bool = False) -> Run:
    """query id -> {document id: cosine} of each query's `top_k` documents."""
    queries = embedder.encode(dataset.query_texts, prompt_name="query", batch_size=batch_size, dim=dim,
                              show_progress=show_progress)
    documents = embedder.encode(dataset.doc_texts, prompt_name="document", batch_size=batch_size, dim=dim,
                                show_progress=show_progress)
    scores, indices = exact_top_k(queries, documents, top_k, show_progress=show_progress)
    return run_from_top_k(dataset, scores, indices)


def bm25_run(dataset: RetrievalDataset, top_k: int = DEFAULT_TOP_K) -> Run:
    import bm25s

    corpus_tokens = bm25s.tokenize(dataset.doc_texts, stopwords=None, show_progress=False)
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index(corpus_tokens, show_progress=False)
    # as strings: the retriever maps them through the corpus vocabulary (ids of a separate
    # tokenisation would index another vocabulary)
    query_tokens = bm25s.tokenize(dataset.query_texts, stopwords=None, return_ids=False, show_progress=False)
    k = min(top_k, len(dataset.doc_ids))
    indices, scores = retriever.retrieve(query_tokens, k=k, show_progress=False, n_threads=1)
    return run_from_top_k(dataset, numpy.asarray(scores), numpy.asarray(indices))


def random_run(dataset: RetrievalDataset, top_k: int = DEFAULT_TOP_K, seed: int = 0) -> Run:
    """Each query ranks `top_k` documents drawn without replacement, in a seeded random order."""
    generator = numpy.random.default_rng(seed)
    k = min(top_k, len(dataset.doc_ids))
    run: Run = {}
    for query in dataset.query_ids:
        picked = generator.choice(len(dataset.doc_ids), size=k, replace=False)
        run[query] = {dataset.doc_ids[int(index)]: float(k - rank) for rank, index in enumerate(picked)}
    return run


def evaluate_run(dataset: RetrievalDataset, run: Run) -> Dict[str, float]:
    return retrieval_metrics(dataset.qrels, run)


def evaluate_embedder(embedder, dataset: RetrievalDataset, dim: Optional[int] = None, top_k: int = DEFAULT_TOP_K,
                      batch_size: int = 32, show_progress: bool = False) -> Tuple[Dict[str, Any], Run]:
    """(metrics with the dim used, the run) of `embedder` on `dataset`."""
    run = embedder_run(embedder, dataset, dim, top_k, batch_size, show_progress)
    return {**evaluate_run(dataset, run), "dim": dim or embedder.dim}, run


def evaluate_baseline(name: str, dataset: RetrievalDataset, top_k: int = DEFAULT_TOP_K,
                      seed: int = 0) -> Tuple[Dict[str, Any], Run]:
    if name == "bm25":
        run = bm25_run(dataset, top_k)
    elif name == "random":
        run = random_run(dataset, top_k, seed)
    else:
        raise ValueError(f"unknown baseline {name!r}; known: {BASELINES}")
    return evaluate_run(dataset, run), run
