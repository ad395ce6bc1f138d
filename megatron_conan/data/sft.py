"""SFT data: (instruction, input, output) examples -> fixed-length causal-LM samples whose loss
covers exactly the output tokens and the final EOD.

On disk (written by `tools/preprocess_data.py --format sft`): a megatron-core indexed dataset in
which every document is one example made of two sequences, the prompt ids (see
`megatron_conan.preprocess.encoders.format_sft_prompt`) and the output ids followed by EOD. The
prompt length is the first sequence's length.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron_conan.errors import ConfigError, DataError


def build_sft_example(prompt_ids: Sequence[int], output_ids: Sequence[int], seq_length: int,
                      pad_id: int, eod_id: int) -> Dict[str, torch.Tensor]:
    """One training sample from an example, as megatron's GPTDataset lays samples out.

    The full sequence is prompt + output + [EOD], cut after `seq_length + 1` tokens; tokens are its
    first `seq_length` positions and labels the same shifted by one (labels[i] = full[i + 1]), both
    padded with `pad_id`. loss_mask[i] is 1 exactly where labels[i] is an output token or the final
    EOD, 0 on prompt labels and padding. `output_ids` must not already end with EOD.
    Returns int64 tokens/labels/position_ids and a float32 loss_mask, all [seq_length].
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    full = numpy.concatenate([numpy.asarray(prompt_ids, dtype=numpy.int64),
                              numpy.asarray(output_ids, dtype=numpy.int64),
                              numpy.array([eod_id], dtype=numpy.int64)])[:seq_length + 1]
    num_labels = len(full) - 1
    tokens = numpy.full(seq_length, pad_id, dtype=numpy.int64)
    labels = numpy.full(seq_length, pad_id, dtype=numpy.int64)
    loss_mask = numpy.zeros(seq_length, dtype=numpy.float32)
    tokens[:num_labels] = full[:-1]
    labels[:num_labels] = full[1:]
    # label i is full[i + 1]; it belongs to the output (or is the EOD) when i + 1 >= len(prompt)
    first_output_label = max(len(prompt_ids) - 1, 0)
    loss_mask[first_output_label:num_labels] = 1.0
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.arange(seq_length, dtype=torch.int64),
    }


class SFTDataset(torch.utils.data.Dataset):
    """Fixed-length SFT samples {tokens, labels, loss_mask, position_ids} from an SFT indexed
    dataset; `indices` selects (and orders) the examples exposed."""

    def __init__(self, path_prefix: str, seq_length: int, pad_id: int, eod_id: int,
                 indices: Optional[numpy.ndarray] = None):
        self.path_prefix = path_prefix
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.eod_id = eod_id
        self.indexed = IndexedDataset(path_prefix, mmap=True)
        document_indices = numpy.asarray(self.indexed.document_indices)
        if not numpy.all(numpy.diff(document_indices) == 2):
            raise DataError(f"{path_prefix} is not an SFT dataset: every document must hold two "
                             f"sequences (prompt, output + EOD)")
        self.num_examples = len(document_indices) - 1
        self.indices = (numpy.arange(self.num_examples, dtype=numpy.int64) if indices is None
                        else numpy.asarray(indices, dtype=numpy.int64))

    def __len__(self) -> int:
        return len(self.indices)

    def example(self, index: int) -> Tuple[numpy.ndarray, numpy.ndarray]:
        """(prompt ids, output ids without the EOD) of example `index` of the file."""
        prompt = self.indexed[2 * int(index)]
        output = self.indexed[2 * int(index) + 1]
        if len(output) == 0 or output[-1] != self.eod_id:
            raise DataError(f"{self.path_prefix}: example {index} does not end with EOD "
                             f"{self.eod_id}; was it written with another tokenizer?")
        return prompt, output[:-1]

    def prompt_length(self, index: int) -> int:
        return int(self.indexed.sequence_lengths[2 * int(self.indices[index])])

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        prompt, output = self.example(self.indices[index])
        return build_sft_example(prompt, output, self.seq_length, self.pad_id, self.eod_id)


def split_indices(num_examples: int, split: str, seed: int) -> List[numpy.ndarray]:
    """Disjoint (train, valid, test) example indices in proportions `split` ("98,2,0"), from one
    seeded permutation."""
    try:
        weights = numpy.array([float(part) for part in split.split(",")], dtype=numpy.float64)
    except ValueError:
        weights = numpy.zeros(0)
    if len(weights) != 3 or (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(f"data.split must be three non-negative numbers such as 98,2,0, got {split!r}")
    bounds = numpy.round(numpy.cumsum(weights / weights.sum()) * num_examples).astype(numpy.int64)
    order = numpy.random.default_rng(seed).permutation(num_examples)
    return numpy.split(order, bounds[:-1])


def build_sft_datasets(path_prefix: str, tokenizer, seq_length: int, split: str = "98,2,0",
                       seed: int = 1234) -> Tuple[Optional[SFTDataset], ...]:
    """(train, valid, test) `SFTDataset`s over disjoint shuffled examples; an empty split is None."""
    full = SFTDataset(path_prefix, seq_length, tokenizer.pad_id, tokenizer.eod_id)
    return tuple(
        SFTDataset(path_prefix, seq_length, tokenizer.pad_id, tokenizer.eod_id, indices)
        if len(indices) else None
        for indices in split_indices(full.num_examples, split, seed))
