"""Data generation: the JSONL that preprocessing reads, made rather than collected (README.md beside
this file): `synthetic` (deterministic multilingual corpora of every kind), `sft_pairs` (SFT triples
-> stage-3 pairs), `clr` (cross-lingual retrieval data), `mining` (hard negatives with an embedder)
and `pydoc_corpus` (real-text corpora from Python's own documentation). Nothing is imported here.
"""
