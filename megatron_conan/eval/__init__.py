"""Evaluation and embedding tools (README.md beside this file): embedders over our checkpoints and
exported directories, exact search, retrieval metrics and baselines, and the MTEB wrapper
(hard-negative mining, which uses them, is in `megatron_conan.datagen.mining`)."""
