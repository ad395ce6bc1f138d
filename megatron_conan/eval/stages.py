"""Evaluate several models of one pipeline on the held-out retrieval splits, beside BM25 and random.

The held-out set has two splits of disjoint module families over one corpus: ``validation``, on
which every choice of the main job is made, and ``test``, which is only reported.

Each model is encoded once per text at its full width; Matryoshka truncations of the chosen model
are scored from those vectors (first `dim` features, re-normalised), so a dim curve costs no more
encoding. Each model gets the query format it was trained with: ``query_prompt`` ``none`` for the
decoder stages and stage 3 (trained on raw queries), ``query`` (the instruction template) for stage
4, whose retrieval data carries the instruction. The search is exact; the metrics are
pytrec_eval's, as MTEB's (``eval/metrics.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy

from megatron_conan.errors import InputError
from megatron_conan.eval.beir import load_beir
from megatron_conan.eval.embedders import load_embedder, truncate_and_normalize
from megatron_conan.eval.retrieval import DEFAULT_TOP_K, evaluate_baseline, evaluate_run, run_from_top_k
from megatron_conan.eval.search import exact_top_k

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelUnderTest:
    """One row of the table."""

    name: str
    """What the table calls it (the stage)."""
    path: str
    """A checkpoint (run dir, checkpoints dir or iter dir) or an exported sentence-transformers dir."""
    query_prompt: str = "none"
    """The prompt name queries are encoded with (`none`, `query`)."""
    max_length: Optional[int] = None
    """Tokens per text for checkpoints (default: the embedder's)."""
    query_instruction: Optional[str] = None
    """For checkpoints: the instruction of the `query` prompt (default: the run's)."""


SPLITS = ("validation", "test")
"""Held-out splits of disjoint module families: choices are made on validation, test is only reported."""


def _available_splits(heldout_dir: str, splits: Sequence[str]) -> List[str]:
    """The requested splits that have judgements (an older corpus has only ``test``)."""
    found = [name for name in splits if os.path.isfile(os.path.join(heldout_dir, "qrels", f"{name}.tsv"))]
    if not found:
        raise InputError(f"{heldout_dir}: no qrels/<split>.tsv for any of {list(splits)}")
    return found


def evaluate_models(heldout_dir: str, models: Sequence[ModelUnderTest], matryoshka_of: Optional[str] = None,
                    dims: Sequence[int] = (), baselines: Sequence[str] = ("bm25", "random"),
                    batch_size: int = 64, show_progress: bool = False,
                    splits: Sequence[str] = SPLITS) -> Dict[str, object]:
    """Every model and baseline on every split (each text encoded once).

    Returns ``{"rows": [{name, kind, dim?, path?, "splits": {split: {ndcg_at_10, recall_at_10,
    recall_at_100, mrr_at_10, ...}}}], "matryoshka": [{dim, "splits": {...}}] of the model named
    `matryoshka_of`, "dataset": {"documents", "queries": {split: count}}}``.
    """
    datasets = {name: load_beir(heldout_dir, name) for name in _available_splits(heldout_dir, splits)}
    corpus = next(iter(datasets.values()))  # the splits share the corpus; their queries differ
    query_texts = sorted({text for dataset in datasets.values() for text in dataset.query_texts})
    rows, curve = [], {}
    for model in models:
        options = {"max_length": model.max_length, "query_instruction": model.query_instruction}
        with load_embedder(model.path, **options) as embedder:
            encoded = embedder.encode(query_texts, prompt_name=model.query_prompt, batch_size=batch_size,
                                      show_progress=show_progress)
            documents = embedder.encode(corpus.doc_texts, prompt_name="document", batch_size=batch_size,
                                        show_progress=show_progress)
            width = embedder.dim
        by_text = dict(zip(query_texts, encoded))
        widths = [width] + ([d for d in dims if d < width] if model.name == matryoshka_of else [])
        for dim in widths:
            per_split = {}
            for split, dataset in datasets.items():
                queries = truncate_and_normalize(numpy.stack([by_text[text] for text in dataset.query_texts]), dim)
                scores, indices = exact_top_k(queries, truncate_and_normalize(documents, dim),
                                              min(DEFAULT_TOP_K, len(dataset.doc_ids)))
                per_split[split] = evaluate_run(dataset, run_from_top_k(dataset, scores, indices))
            if dim == width:
                rows.append({"name": model.name, "kind": "model", "path": model.path, "dim": dim, "splits": per_split})
            if model.name == matryoshka_of:
                curve[dim] = {"dim": dim, "splits": per_split}
        logger.info("%s: nDCG@10 %s", model.name,
                    ", ".join(f"{split} {metrics['ndcg_at_10']:.4f}" for split, metrics in rows[-1]["splits"].items()))
    for baseline in baselines:
        per_split = {split: evaluate_baseline(baseline, dataset)[0] for split, dataset in datasets.items()}
        rows.append({"name": {"bm25": "BM25", "random": "random"}[baseline], "kind": "baseline", "splits": per_split})
    return {"rows": rows, "matryoshka": [curve[dim] for dim in sorted(curve)],
            "dataset": {"documents": len(corpus.doc_ids),
                        "queries": {split: len(dataset.query_ids) for split, dataset in datasets.items()}}}


def score(row: dict, split: str = "validation", metric: str = "ndcg_at_10") -> float:
    """One figure of an evaluation row (validation by default: the split choices are made on)."""
    return float(row["splits"][split][metric])
