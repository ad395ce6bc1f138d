"""Retrieval metrics computed by ``pytrec_eval`` (trec_eval's code, what MTEB uses), so our numbers
are comparable with MTEB's.

- ``ndcg_at_10``: trec_eval ``ndcg_cut_10`` (graded gains, log2 discount, ideal from all judgements);
- ``recall_at_10`` / ``recall_at_100``: ``recall_10`` / ``recall_100`` (relevant = relevance > 0);
- ``mrr_at_10``: ``recip_rank`` over each query's 10 best documents, i.e. 1 / rank of the first
  relevant document in the top 10, else 0 (MTEB's ``mrr_at_10``).

Ranking follows trec_eval: score descending, ties broken by document id descending. Every judged
query counts: a query the run does not cover scores 0 (trec_eval would silently leave it out).
"""

from __future__ import annotations

from typing import Dict, Mapping

METRIC_NAMES = ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10")
"""The metrics conan-eval reports, in table order."""
_TREC_MEASURES = {"ndcg_at_10": "ndcg_cut_10", "recall_at_10": "recall_10", "recall_at_100": "recall_100"}

Run = Mapping[str, Mapping[str, float]]
"""query id -> {document id: score}."""


def _top(run: Run, depth: int) -> Dict[str, Dict[str, float]]:
    """Each query's `depth` best documents in trec_eval's order (score desc, then id desc)."""
    return {query: dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:depth])
            for query, docs in run.items()}


def per_query_metrics(qrels: Mapping[str, Mapping[str, int]], run: Run) -> Dict[str, Dict[str, float]]:
    """query id -> {metric: value} for every judged query (see the module docstring)."""
    import pytrec_eval

    qrels = {query: dict(judged) for query, judged in qrels.items()}
    run = {query: {doc: float(score) for doc, score in docs.items()} for query, docs in run.items() if query in qrels}
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10,100"}).evaluate(run)
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(_top(run, 10))
    results = {}
    for query in qrels:
        values = {name: cut.get(query, {}).get(measure, 0.0) for name, measure in _TREC_MEASURES.items()}
        values["mrr_at_10"] = reciprocal.get(query, {}).get("recip_rank", 0.0)
        results[query] = values
    return results


def retrieval_metrics(qrels: Mapping[str, Mapping[str, int]], run: Run) -> Dict[str, float]:
    """Each metric's mean over the judged queries, plus ``num_queries``."""
    per_query = per_query_metrics(qrels, run)
    count = len(per_query)
    means: Dict[str, float] = {name: sum(values[name] for values in per_query.values()) / max(count, 1)
                               for name in METRIC_NAMES}
    means["num_queries"] = count
    return means
