"""Megatron <-> Hugging Face and Megatron -> sentence-transformers conversion (README.md beside this
file): a key map, the config and tokenizer mappings, and the three conversions in ``export``."""
