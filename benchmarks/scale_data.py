"""Inputs of the scale benchmark (benchmarks/scale.py), made once per size and cached in its work dir.

Text is real-shaped and never repeats: words drawn with the frequencies they have in Python's own
docstrings (``testing.tiny_models.pydoc_texts``), document lengths drawn log-normally, each document
from its own random stream, so no two documents (or pairs) are the same and the preprocessing word
cache sees a realistic share of repeated words, not repeated documents.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import List, Tuple

import numpy

SEED = 20261207
WORDS_PER_DOCUMENT = 60
"""Median words per pretraining document (about 80 tokens with the benchmark's 4,096-piece tokenizer)."""


def vocabulary() -> Tuple[List[str], numpy.ndarray]:
    """(words, probabilities) of the words of Python's docstrings."""
    from megatron_conan.testing.tiny_models import pydoc_texts

    counts: Counter = Counter()
    for text in pydoc_texts():
        counts.update(text.split())
    words = sorted(counts)
    frequencies = numpy.array([counts[word] for word in words], dtype=numpy.float64)
    return words, frequencies / frequencies.sum()


class TextSource:
    """Documents of `median_words` words (log-normal spread), stream `stream` of the seed."""

    def __init__(self, stream: int, median_words: int = WORDS_PER_DOCUMENT):
        self.words, self.probabilities = vocabulary()
        self.table = numpy.array(self.words + ["\n"], dtype=object)
        self.rng = numpy.random.default_rng([SEED, stream])
        self.median_words = median_words

    def documents(self, count: int) -> List[str]:
        """`count` new documents (one join over all of them: fast for millions of words)."""
        lengths = numpy.maximum(3, self.rng.lognormal(numpy.log(self.median_words), 0.6, count).astype(numpy.int64))
        ids = self.rng.choice(len(self.words), size=int(lengths.sum()), p=self.probabilities)
        boundaries = numpy.cumsum(lengths)[:-1]
        ids = numpy.insert(ids, boundaries, len(self.words))  # the "\n" word between documents
        return " ".join(self.table[ids]).split(" \n ")


def ensure_jsonl(path: str, count: int, kind: str) -> str:
    """`path` holding `count` records of `kind` (`text`, `sft`, `pair`), written once."""
    if os.path.exists(path):
        return path
    stream = {"text": 1, "sft": 2, "pair": 3}[kind]
    source = TextSource(stream, median_words=WORDS_PER_DOCUMENT if kind == "text" else 20)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        for start in range(0, count, 100_000):
            chunk = min(100_000, count - start)
            if kind == "text":
                records = [{"text": text} for text in source.documents(chunk)]
            elif kind == "sft":
                first, second = source.documents(chunk), source.documents(chunk)
                records = [{"instruction": a[:80], "input": "", "output": b} for a, b in zip(first, second)]
            else:
                queries, positives = source.documents(chunk), source.documents(chunk)
                records = [{"task": "pair", "query": q, "positive": p} for q, p in zip(queries, positives)]
            handle.write("".join(json.dumps(record) + "\n" for record in records))
    os.replace(temporary, path)
    return path


def ensure_tokenizer(work_dir: str) -> str:
    """A 4,096-piece SentencePiece model trained on 20,000 generated documents (once)."""
    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer

    prefix = os.path.join(work_dir, "tokenizer")
    if not os.path.exists(prefix + ".model"):
        corpus = ensure_jsonl(os.path.join(work_dir, "tokenizer_corpus.jsonl"), 20_000, "text")
        train_tokenizer([corpus], prefix, TokenizerTrainingConfig(vocab_size=4096, num_threads=2, seed=0))
    return prefix + ".model"


def ensure_indexed(work_dir: str, documents: int, kind: str = "text") -> str:
    """The preprocessed dataset of `documents` generated records (format `text` or `sft`)."""
    from megatron_conan.data.indexed import dataset_exists
    from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, preprocess_jsonl

    prefix = os.path.join(work_dir, f"{kind}_{documents}")
    if not dataset_exists(prefix):
        source = ensure_jsonl(os.path.join(work_dir, f"{kind}_{documents}.jsonl"), documents, kind)
        preprocess_jsonl(PreprocessConfig(inputs=[source], output_prefix=prefix, format=kind,
                                          tokenizer_model=ensure_tokenizer(work_dir), workers=2, progress=False))
    return prefix


def ensure_store(work_dir: str, pairs: int) -> str:
    """The contrastive store of `pairs` generated pairs."""
    from megatron_conan.preprocess.contrastive_tokenize import tokenize_contrastive
    from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig

    prefix = os.path.join(work_dir, f"store_{pairs}")
    if not os.path.exists(prefix + ".idx"):
        source = ensure_jsonl(os.path.join(work_dir, f"pairs_{pairs}.jsonl"), pairs, "pair")
        tokenize_contrastive(PreprocessConfig(inputs=[source], output_prefix=prefix, workers=2, progress=False,
                                              tokenizer_model=ensure_tokenizer(work_dir)))
    return prefix


def unit_vectors(count: int, dim: int, stream: int) -> numpy.ndarray:
    """[count, dim] float32 random unit vectors (embeddings stand-in for the search steps)."""
    rng = numpy.random.default_rng([SEED, 100 + stream])
    vectors = rng.standard_normal((count, dim), dtype=numpy.float32)
    vectors /= numpy.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


class TableEmbedder:
    """An embedder whose vectors are rows of a fixed random table (cycled): mining's cost without a
    model's (encoding is measured by the `encode` step). Interface of ``eval.embedders``."""

    name = "random-table"

    def __init__(self, dim: int, rows: int = 65_536):
        self.dim = dim
        self.table = unit_vectors(rows, dim, stream=7)
        self.calls = 0

    def prompt_text(self, prompt_name) -> str:
        return ""

    def encode(self, texts, prompt_name=None, prompt_text=None, batch_size=32, dim=None, show_progress=False):
        rows = (numpy.arange(len(texts)) + self.calls) % len(self.table)
        self.calls += len(texts)
        return self.table[rows]
