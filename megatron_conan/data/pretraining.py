"""Blended pretraining data: weighted indexed-dataset sources -> megatron-core train/valid/test.

    cfg = BlendedDataConfig.from_dict({"sources": [{"prefix": "data/web", "weight": 0.7},
                                                   {"prefix": "data/code", "weight": 0.3}], "split": "98,1,1"})
    train, valid, test = build_pretrain_datasets(cfg, tokenizer, seq_length=2048,
                                                 num_samples=(1_000_000, 10_000, 10_000))

Items are `GPTDataset` dicts: tokens, labels (shifted by one), loss_mask, position_ids. Sampling is
megatron-core's: per source a `GPTDataset` over its split of documents, mixed by a `BlendedDataset`
whose index is deterministic for the seed; all indices are cached in `cache_dir`. The config
(`BlendedDataConfig`) is a run config's ``data.blend`` section (config/data.py,
examples/conan_1p4b/pretrain.yaml).
"""

import contextlib
import logging
from typing import Callable, Iterator, Optional, Sequence
from unittest import mock

import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_conan.config.data import BlendedDataConfig

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _rank_zero_without_process_group() -> Iterator[None]:
    """megatron-core's `BlendedDataset` calls `torch.distributed.get_rank()` when a cache path is
    set, without checking that a process group exists. Outside distributed runs (tools, tests,
    notebooks) answer 0 there; when a group exists nothing changes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with mock.patch.object(torch.distributed, "get_rank", lambda group=None: 0):
        yield


def gpt_dataset_config(cfg: BlendedDataConfig, tokenizer: MegatronTokenizerBase,
                       seq_length: int) -> GPTDatasetConfig:
    prefixes, weights = cfg.blend
    return GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=cfg.split,
        path_to_cache=cfg.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=cfg.mmap_bin_files,
        num_dataset_builder_threads=cfg.num_dataset_builder_threads,
    )


def build_pretrain_datasets(cfg: BlendedDataConfig, tokenizer: MegatronTokenizerBase,
                            seq_length: int, num_samples: Sequence[Optional[int]],
                            is_built_on_rank: Optional[Callable[[], bool]] = None):
    """(train, valid, test) datasets of `num_samples` samples each (None for a split with weight 0
    gives None). With torch.distributed initialised, megatron-core builds the index caches on rank
    0 first and the other ranks then load them; call this on every rank. `is_built_on_rank` lets
    ranks that never read data (e.g. later pipeline stages) skip building (default: all build).
    """
    if len(num_samples) != 3:
        raise ValueError("num_samples must give (train, valid, test)")
    for source in cfg.sources:
        if not IndexedDataset.exists(source.prefix):
            raise FileNotFoundError(f"source {source.name!r}: no {source.prefix}.bin/.idx")
    config = gpt_dataset_config(cfg, tokenizer, seq_length)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), config)
    with _rank_zero_without_process_group():
        train, valid, test = builder.build()
    logger.info("built pretraining data: %s", {
        name: (len(dataset) if dataset is not None else None)
        for name, dataset in zip(("train", "valid", "test"), (train, valid, test))})
    return train, valid, test
