"""Evaluate several models of one pipeline on the same held-out retrieval split, beside BM25 and random.

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
from typing import Dict, List, Optional, Sequence

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


def evaluate_models(heldout_dir: str, models: Sequence[ModelUnderTest], matryoshka_of: Optional[str] = None,
                    dims: Sequence[int] = (), baselines: Sequence[str] = ("bm25", "random"),
                    batch_size: int = 64, show_progress: bool = False) -> Dict[str, List[dict]]:
    """{"rows": [{name, kind, ndcg_at_10, recall_at_10, recall_at_100, mrr_at_10, ...}],
    "matryoshka": [{dim, ndcg_at_10, ...}] of the model named `matryoshka_of`}."""
    dataset = load_beir(heldout_dir, "test")
    rows, curve = [], []
    for model in models:
        options = {"max_length": model.max_length, "query_instruction": model.query_instruction}
        with load_embedder(model.path, **options) as embedder:
            queries = embedder.encode(dataset.query_texts, prompt_name=model.query_prompt, batch_size=batch_size,
                                      show_progress=show_progress)
            documents = embedder.encode(dataset.doc_texts, prompt_name="document", batch_size=batch_size,
                                        show_progress=show_progress)
            width = embedder.dim
        for dim in ([width] + [d for d in dims if d < width] if model.name == matryoshka_of else [width]):
            scores, indices = exact_top_k(truncate_and_normalize(queries, dim), truncate_and_normalize(documents, dim),
                                          min(DEFAULT_TOP_K, len(dataset.doc_ids)))
            metrics = evaluate_run(dataset, run_from_top_k(dataset, scores, indices))
            if dim == width:
                rows.append({"name": model.name, "kind": "model", "path": model.path, "dim": dim, **metrics})
            if model.name == matryoshka_of:
                curve.append({"dim": dim, **metrics})
        logger.info("%s: nDCG@10 %.4f", model.name, rows[-1]["ndcg_at_10"])
    for baseline in baselines:
        metrics, _ = evaluate_baseline(baseline, dataset)
        rows.append({"name": {"bm25": "BM25", "random": "random"}[baseline], "kind": "baseline", **metrics})
    return {"rows": rows, "matryoshka": sorted(curve, key=lambda entry: entry["dim"]),
            "dataset": {"queries": len(dataset.query_ids), "documents": len(dataset.doc_ids)}}
