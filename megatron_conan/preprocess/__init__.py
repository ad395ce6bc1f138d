"""Offline preprocessing: JSONL -> megatron-core indexed data (`jsonl_to_indexed`, with the worker pool
of `parallel_encode` and the line encoders of `encoders`) and contrastive JSONL -> the tokenized
contrastive store (`contrastive_tokenize`). README.md beside this file describes the tools; the
formats they write are in megatron_conan/data/README.md.

This path imports neither torch nor megatron-core (tests/data/test_indexed.py checks), so nothing
is imported here: workers import only the light modules they need.
"""
