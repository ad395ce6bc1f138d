"""Before the first step: the model, the tokenizer and the data must agree.

A token id beyond the model's vocabulary crashes deep inside the embedding lookup (or, worse, hits a
padding row and trains garbage), and data tokenized by another tokenizer trains silently on the
wrong text. Both are checked here, by every stage, with errors that name the config field.
"""

from __future__ import annotations

import os

from megatron_conan.data.tokenizer import ConanTokenizer
from megatron_conan.errors import ConfigError


def load_checked_tokenizer(cfg, model_config):
    """The run's ConanTokenizer (``data.tokenizer``), refused unless its vocabulary is the model's."""
    path = cfg.data.tokenizer
    if not path:
        raise ConfigError(f"data.tokenizer is required for data.kind={cfg.data.kind}")
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer: no such file: {path}")
    tokenizer = ConanTokenizer(path)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({model_config.vocab_size} ids, model.overrides.vocab_size) differs "
            f"from the tokenizer's ({tokenizer.vocab_size} ids, data.tokenizer={path}): set "
            f"model.overrides.vocab_size={tokenizer.vocab_size}")
    return tokenizer
