"""The preprocessing tests share the data tests' fixtures (a tiny multilingual corpus and a
tokenizer trained on it, see tests/data/conftest.py)."""

from tests.data.conftest import corpus_dir, tokenizer, tokenizer_model  # noqa: F401 - fixtures (used by name)

__all__ = ["corpus_dir", "tokenizer", "tokenizer_model"]  # pytest finds them here by name
