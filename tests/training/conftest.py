"""Shared fixtures of the embedding-stage tests: a tokenizer and contrastive stores (seconds, offline)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_VOCAB = 512  # the tiny model's vocabulary: no override needed


def tokenize_contrastive(jsonl, prefix, tokenizer_model):
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "tokenize_contrastive.py"), "--input", str(jsonl),
                    "--output-prefix", str(prefix), "--tokenizer-model", tokenizer_model, "--no-progress"],
                   check=True, capture_output=True)


@pytest.fixture(scope="session")
def embedding_data(tmp_path_factory):
    """A 512-piece tokenizer and a store of `pair` examples (synthetic multilingual text)."""
    from megatron_conan.data import synthetic
    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer

    directory = tmp_path_factory.mktemp("embedding_data")
    synthetic.write_pretraining_jsonl(str(directory / "text.jsonl"), num_docs=300, seed=3)
    train_tokenizer([str(directory / "text.jsonl")], str(directory / "tokenizer"),
                    TokenizerTrainingConfig(vocab_size=TINY_VOCAB, num_threads=1, character_coverage=0.98))
    tokenizer = str(directory / "tokenizer.model")
    synthetic.write_contrastive_jsonl(str(directory / "pairs.jsonl"), examples_per_task=96, tasks=("pair",), seed=4)
    tokenize_contrastive(directory / "pairs.jsonl", directory / "pairs", tokenizer)
    return {"dir": directory, "tokenizer": tokenizer, "pairs": str(directory / "pairs")}
