"""Forward step of the language-model stages (pretrain, SFT) for megatron-core's schedules.

A batch is a dict of [b, s] tensors ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (what
megatron-core's GPTDataset and our SFT dataset yield). The model computes the vocab-parallel
cross-entropy itself when given labels, so logits are never gathered over TP ranks.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator

import torch

from megatron_conan.losses.lm import masked_token_mean


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Schedule callback: per-token losses [b, s] -> masked mean."""
    return masked_token_mean(output_tensor, loss_mask)


def lm_forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model: torch.nn.Module):
    """``forward_step_func`` for ``get_forward_backward_func()``."""
    batch = next(data_iterator)
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )  # [b, s] per-token loss on the last stage, hidden states elsewhere
    return output, partial(lm_loss_func, batch["loss_mask"])
