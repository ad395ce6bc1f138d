"""The language-model stages' datasets and their data position.

``data.kind`` ``blended`` (megatron-core GPTDataset over weighted indexed sources), ``sft`` (our SFT
dataset: loss on output tokens only) or ``synthetic`` (random motifs, no files). The data position is
one number, ``consumed_samples``: global batch ``b`` covers dataset indices ``[b*G, (b+1)*G)``
(wrapping around), DP rank ``r`` takes the r-th contiguous slice, cut into micro-batches.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_conan.data.pretraining import build_pretrain_datasets
from megatron_conan.data.sft import build_sft_datasets


class SyntheticLMDataset(torch.utils.data.Dataset):
    """Deterministic random-token sequences: smoke tests and throughput runs with no files."""

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int):
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        # A learnable signal: each sequence repeats a short random motif.
        motif = torch.randint(0, self.vocab_size, (8,), generator=generator)
        tokens = motif.repeat(self.seq_length // 8 + 2)[: self.seq_length + 1]
        return {
            "tokens": tokens[:-1].clone(),
            "labels": tokens[1:].clone(),
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]
            if key in ("tokens", "labels", "loss_mask", "position_ids")}


def step_microbatches(dataset, consumed_samples: int, global_batch: int, micro_batch: int,
                      dp_rank: int, dp_size: int) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at `consumed_samples` (CPU tensors).

    Global batch b covers dataset indices [consumed, consumed + global_batch) (wrapping around
    epochs); DP rank r takes the r-th contiguous slice. Datasets shuffle internally (GPTDataset).
    """
    per_rank = global_batch // dp_size
    start = consumed_samples + dp_rank * per_rank
    indices = [(start + i) % len(dataset) for i in range(per_rank)]
    return [collate([dataset[j] for j in indices[i:i + micro_batch]]) for i in range(0, per_rank, micro_batch)]


def build_lm_datasets(cfg, model_config, tokenizer, num_train_samples: int, num_valid_samples: int):
    """(train, valid) datasets of the run's data section (`tokenizer`: None for synthetic data)."""
    data = cfg.data
    if data.kind == "synthetic":
        return (SyntheticLMDataset(model_config.vocab_size, cfg.train.seq_length, max(num_train_samples, 1), cfg.train.seed),
                SyntheticLMDataset(model_config.vocab_size, cfg.train.seq_length, max(num_valid_samples, 1), cfg.train.seed + 1))
    if data.kind == "blended":
        train, valid, _ = build_pretrain_datasets(data.blend, tokenizer, cfg.train.seq_length,
                                                  (num_train_samples, num_valid_samples, 0))
        return train, valid
    train, valid, _ = build_sft_datasets(data.sft_prefix, tokenizer, cfg.train.seq_length, split=data.split,
                                         seed=cfg.train.seed)
    return train, valid


def data_prefixes(cfg):
    """The indexed datasets a language-model run reads."""
    if cfg.data.kind == "blended":
        return [source.prefix for source in cfg.data.blend.sources]
    if cfg.data.kind == "sft":
        return [cfg.data.sft_prefix]
    return []
