"""Exact top-k inner-product search in bounded memory (retrieval evaluation and hard-negative mining).

Queries and corpus are unit vectors, so the inner product is the cosine. The corpus is read in
blocks (a NumPy array, a ``numpy.memmap`` on disk, or a torch tensor: anything sliceable by rows),
each block is scored against a block of queries with one matrix product, and a running top-k per
query is merged with the block's own top-k. Memory: ``query_block * (corpus_block + 2 k)`` scores
plus one block of each, whatever the corpus size. Exact: every (query, document) pair is scored.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy
import torch

from megatron_conan.distributed.device import indexed_device


def _rows(array, start: int, stop: int, device: torch.device) -> torch.Tensor:
    block = array[start:stop]
    tensor = block if isinstance(block, torch.Tensor) else torch.from_numpy(numpy.ascontiguousarray(block))
    return tensor.to(device=device, dtype=torch.float32)


def exact_top_k(queries, corpus, k: int, query_block: int = 1024, corpus_block: int = 16384,
                device: Optional[str] = None, show_progress: bool = False) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """The `k` best corpus rows per query by inner product, best first.

    Args:
        queries: [nq, d] array-like; corpus: [nc, d] array-like (rows are read block by block).
    Returns:
        scores [nq, min(k, nc)] float32 and indices [nq, min(k, nc)] int64 into the corpus.
    """
    from tqdm.auto import tqdm

    num_queries, num_docs = len(queries), len(corpus)
    if k < 1 or query_block < 1 or corpus_block < 1:
        raise ValueError(f"k, query_block and corpus_block must be >= 1, got {k}, {query_block}, {corpus_block}")
    if num_queries and num_docs and queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features, the corpus {corpus.shape[1]}")
    k = min(k, num_docs)
    target = indexed_device(device or "cpu")  # "cuda" alone means this rank's GPU
    scores_out = numpy.empty((num_queries, k), dtype=numpy.float32)
    indices_out = numpy.empty((num_queries, k), dtype=numpy.int64)
    steps = -(-num_queries // query_block) * -(-num_docs // corpus_block)
    with tqdm(total=steps, desc="searching", unit="block", disable=not show_progress) as progress:
        for q_start in range(0, num_queries, query_block):
            query_rows = _rows(queries, q_start, q_start + query_block, target)  # [bq, d]
            best_scores = torch.full((len(query_rows), 0), float("-inf"), device=target)  # [bq, <=k]
            best_indices = torch.zeros((len(query_rows), 0), dtype=torch.long, device=target)
            for c_start in range(0, num_docs, corpus_block):
                doc_rows = _rows(corpus, c_start, c_start + corpus_block, target)  # [bc, d]
                block_scores = query_rows @ doc_rows.T  # [bq, bc]
                top_scores, top_positions = block_scores.topk(min(k, block_scores.shape[1]), dim=1)
                merged_scores = torch.cat([best_scores, top_scores], dim=1)  # [bq, <=2k]
                merged_indices = torch.cat([best_indices, top_positions + c_start], dim=1)
                best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
                best_indices = merged_indices.gather(1, order)
                progress.update(1)
            scores_out[q_start:q_start + len(query_rows)] = best_scores.cpu().numpy()
            indices_out[q_start:q_start + len(query_rows)] = best_indices.cpu().numpy()
    return scores_out, indices_out


ANN_ENCODINGS = {"fp16": "QT_fp16", "sq8": "QT_8bit"}
"""How the approximate index stores vectors: fp16 (2 bytes a feature, scores within ~1e-3 of the
exact ones) or 8-bit scalar quantisation (1 byte a feature, coarser scores)."""


def default_ann_lists(num_docs: int) -> int:
    """Inverted lists (k-means cells) of the approximate index: about 4 sqrt(N), as faiss advises."""
    return max(1, min(num_docs, int(4 * num_docs ** 0.5)))


def import_faiss():
    """faiss, or an InputError naming the optional extra that installs it."""
    try:
        import faiss
    except ImportError:
        from megatron_conan.errors import InputError

        raise InputError("approximate search needs faiss: pip install 'megatron_conan[ann]' (faiss-cpu), "
                         "or use exact search") from None
    return faiss


def ann_top_k(queries, corpus, k: int, lists: Optional[int] = None, probe: int = 32, encoding: str = "fp16",
              train_size: Optional[int] = None, block: int = 65536, seed: int = 0,
              show_progress: bool = False) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """The `k` best corpus rows per query by inner product, best first, from a faiss inverted-file
    index (IVF: k-means cells over the corpus, `probe` cells searched per query). Same inputs and
    outputs as :func:`exact_top_k`; approximate: a true neighbour in an unprobed cell is missed.
    With ``probe >= lists`` every cell is searched, and only the stored encoding rounds scores.

    Cost: 10 rounds of k-means on ``train_size`` rows (default 64 per list), one pass adding the corpus block by
    block (the index holds it in `encoding`: 2 or 1 bytes a feature), then per query ``lists``
    centroid scores plus about ``N * probe / lists`` vector scores, instead of N.
    """
    from tqdm.auto import tqdm

    faiss = import_faiss()
    num_queries, num_docs = len(queries), len(corpus)
    if k < 1 or probe < 1 or block < 1:
        raise ValueError(f"k, probe and block must be >= 1, got {k}, {probe}, {block}")
    if encoding not in ANN_ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ANN_ENCODINGS)}, got {encoding!r}")
    k = min(k, num_docs)
    if num_queries == 0 or k == 0:
        return numpy.zeros((num_queries, k), numpy.float32), numpy.zeros((num_queries, k), numpy.int64)
    dim = corpus.shape[1]
    lists = min(lists or default_ann_lists(num_docs), num_docs)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, lists, getattr(faiss.ScalarQuantizer, ANN_ENCODINGS[encoding]),
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10  # k-means rounds: cells need to be good, not converged (faiss's default is 25)
    sample = numpy.random.default_rng(seed).choice(num_docs, min(num_docs, train_size or 64 * lists), replace=False)
    index.train(numpy.ascontiguousarray(corpus[numpy.sort(sample)], dtype=numpy.float32))
    for start in tqdm(range(0, num_docs, block), desc="indexing", unit="block", disable=not show_progress):
        index.add(numpy.ascontiguousarray(corpus[start:start + block], dtype=numpy.float32))
    index.nprobe = min(probe, lists)
    scores_out = numpy.empty((num_queries, k), dtype=numpy.float32)
    indices_out = numpy.empty((num_queries, k), dtype=numpy.int64)
    for start in tqdm(range(0, num_queries, block), desc="searching", unit="block", disable=not show_progress):
        rows = numpy.ascontiguousarray(queries[start:start + block], dtype=numpy.float32)
        scores_out[start:start + len(rows)], indices_out[start:start + len(rows)] = index.search(rows, k)
    return scores_out, indices_out
