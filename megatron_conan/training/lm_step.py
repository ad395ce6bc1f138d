"""Forward step of the language-model stages (pretrain, SFT) for megatron-core's schedules.

A batch is a dict of [b, s] tensors ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (what
megatron-core's GPTDataset and our SFT dataset yield), plus the scalar ``loss_normalizer`` that
:func:`attach_loss_normalizer` adds: every micro-batch's loss is its token-loss sum divided by it,
which makes the step's gradient that of the mean over every loss token of the global batch
(``losses/lm.py``). The model computes the vocab-parallel cross-entropy itself when given labels,
so logits are never gathered over TP ranks.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, List

import torch
from megatron.core import parallel_state

from megatron_conan.distributed.device import Placement
from megatron_conan.losses.lm import token_normalized_loss


def attach_loss_normalizer(microbatches: List[Dict[str, torch.Tensor]], placement: Placement) -> int:
    """Set ``loss_normalizer = T / (D * M)`` in each of this DP rank's `microbatches` (on the
    placement's device); T, the global batch's loss tokens, takes one all-reduce over DP. Returns T."""
    local = placement.zeros(1, dtype=torch.float64)
    for batch in microbatches:
        local += batch["loss_mask"].to(local.device, torch.float64).sum()
    placement.all_reduce(local, group=parallel_state.get_data_parallel_group())
    total_tokens = float(local.item())
    scale = max(total_tokens, 1.0) / (parallel_state.get_data_parallel_world_size() * len(microbatches))
    normalizer = placement.tensor(scale, dtype=torch.float32)
    for batch in microbatches:
        batch["loss_normalizer"] = normalizer
    return int(total_tokens)


def lm_loss_func(loss_mask: torch.Tensor, normalizer: torch.Tensor, output_tensor: torch.Tensor):
    """Schedule callback: per-token losses [b, s] -> (normalised sum, report)."""
    return token_normalized_loss(output_tensor, loss_mask, normalizer)


def lm_forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model: torch.nn.Module):
    """``forward_step_func`` for ``get_forward_backward_func()``; batches are already on the device.

    A batch without ``loss_normalizer`` (evaluation) counts as its own mean for the gradient; the
    reported loss is the token mean either way.
    """
    batch = next(data_iterator)
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )  # [b, s] per-token loss on the last stage, hidden states elsewhere
    normalizer = batch.get("loss_normalizer")
    if normalizer is None:
        normalizer = batch["loss_mask"].sum().clamp(min=1.0)
    return output, partial(lm_loss_func, batch["loss_mask"], normalizer)
