"""Blended pretraining data: weighted indexed-dataset sources -> megatron-core train/valid/test.

    cfg = BlendedDataConfig.from_dict({"sources": [{"prefix": "data/web", "weight": 0.7},
                                                   {"prefix": "data/code", "weight": 0.3}], "split": "98,1,1"})
    train, valid, test = build_pretrain_datasets(cfg, tokenizer, seq_length=2048,
                                                 num_samples=(1_000_000, 10_000, 10_000))

Items are `GPTDataset` dicts: tokens, labels (shifted by one), loss_mask, position_ids. Sampling is
megatron-core's: per source a `GPTDataset` over its split of documents, mixed by a `BlendedDataset`
whose index is deterministic for the seed; all indices are cached in `cache_dir`. A run config's
``data.blend`` section holds these fields (examples/conan_1p4b/pretrain.yaml).
"""

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from unittest import mock

import torch
import yaml

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_conan.config.loader import from_dict
from megatron_conan.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DataSource:
    """One source of the blend."""

    prefix: str
    """Indexed dataset path prefix (without .bin/.idx)."""
    weight: float = 1.0
    """Relative sampling weight; weights are normalised over the sources."""
    name: Optional[str] = None
    """Label for logs (news, qa, web, multilingual...); defaults to the prefix."""

    def __post_init__(self) -> None:
        if not self.prefix:
            raise ConfigError("sources[].prefix must be set")
        if not self.weight > 0:
            raise ConfigError(f"sources[].weight must be positive, got {self.weight} for {self.prefix}")
        if self.name is None:
            self.name = self.prefix


@dataclasses.dataclass
class BlendedDataConfig:
    """The pretraining data blend."""

    sources: List[DataSource]
    """Sources and their weights."""
    split: str = "98,1,1"
    """Train/valid/test proportions of each source's documents."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches its document/sample/shuffle and blending indices (None: rebuilt
    every time, in memory)."""
    seed: int = 1234
    """Seed of every shuffle and of the blend."""
    reset_position_ids: bool = False
    """Restart position ids after each EOD (documents packed in one sample stay separate in RoPE).
    Attention still spans the documents packed in a sample: Megatron-LM's `reset_attention_mask`
    is not offered, since our attention takes only causal, key-padding or soft masks."""
    eod_mask_loss: bool = False
    """Do not train on predicting the EOD token."""
    mmap_bin_files: bool = True
    """Memory-map the .bin files (else read with file pointers)."""
    num_dataset_builder_threads: int = 1
    """Threads megatron-core uses to build the per-source datasets."""

    def __post_init__(self) -> None:
        self.sources = [source if isinstance(source, DataSource) else from_dict(DataSource, source, "sources[]")
                        for source in self.sources]
        if not self.sources:
            raise ConfigError("sources: at least one source is needed")
        parts = self.split.replace("/", ",").split(",")
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise ConfigError(f"split must be like '98,1,1', got {self.split!r}") from None
        if len(values) != 3 or any(value < 0 for value in values) or sum(values) <= 0:
            raise ConfigError(f"split must be three non-negative numbers, got {self.split!r}")

    @classmethod
    def from_dict(cls, values: Dict[str, Any], path: str = "") -> "BlendedDataConfig":
        """Typed build from a mapping (see config/loader.py); errors name keys under `path`."""
        return from_dict(cls, values, path)

    @classmethod
    def from_yaml(cls, path: str) -> "BlendedDataConfig":
        """Reads the config from a YAML mapping; a top-level `data:` key is also accepted."""
        with open(path, encoding="utf-8") as stream:
            values = yaml.safe_load(stream)
        if isinstance(values, dict) and set(values) == {"data"}:
            values = values["data"]
        return cls.from_dict(values)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def blend(self) -> Tuple[List[str], List[float]]:
        return [source.prefix for source in self.sources], [source.weight for source in self.sources]


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
