"""Evaluation and embedding tools (README.md beside this file): embedders over our checkpoints and
exported directories, exact search, retrieval metrics and baselines, the MTEB wrapper, and
hard-negative mining."""
