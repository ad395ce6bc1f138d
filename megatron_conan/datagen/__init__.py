"""Data generation: tools that build the training JSONL that preprocessing reads (README.md beside
this file): `synthetic` (deterministic multilingual corpora of every kind), `sft_pairs` (SFT triples
-> stage-3 pairs), `clr` (cross-lingual retrieval data), `mining` (hard negatives with an embedder)
and `pydoc` (real-text corpora from Python's own documentation). Nothing is imported here.
"""
