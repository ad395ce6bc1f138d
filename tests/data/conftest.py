"""Shared fixtures: a tiny multilingual corpus and a tokenizer trained on it (seconds, offline)."""

import os

import pytest

from megatron_conan.data.tokenizer import ConanTokenizer, TokenizerTrainingConfig, train_tokenizer
from megatron_conan.datagen import synthetic

TINY_VOCAB = 1000


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    synthetic.write_pretraining_jsonl(str(directory / "mixed.jsonl"), num_docs=400, seed=0)
    return directory


@pytest.fixture(scope="session")
def tokenizer_model(corpus_dir):
    prefix = str(corpus_dir / "tokenizer")
    train_tokenizer([str(corpus_dir / "mixed.jsonl")], prefix,
                    TokenizerTrainingConfig(vocab_size=TINY_VOCAB, num_threads=1))
    return prefix + ".model"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_model):
    return ConanTokenizer(tokenizer_model)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(relative_path: str):
    """Imports a benchmark script by path: benchmarks/ is not a package on sys.path."""
    import importlib.util

    path = os.path.join(REPO_ROOT, relative_path)
    name = "_script_" + relative_path.replace("/", "_").replace(".py", "")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def scripts():
    return load_script
