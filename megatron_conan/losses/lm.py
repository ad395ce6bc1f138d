"""Next-token cross-entropy for pretraining and SFT (loss maths only; no model here)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch


def masked_token_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Mean of `per_token_loss` [b, s] over positions where `loss_mask` [b, s] is 1.

    Returns megatron-core's ``(loss, {name: value})`` pair for a pipeline schedule's loss function.
    A micro-batch with no supervised token contributes zero loss (and zero gradient).
    """
    mask = loss_mask.to(per_token_loss.device).float()  # [b, s]
    total = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    loss = total / count.clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone(), "tokens": count.detach()}



def token_normalized_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, normalizer: torch.Tensor
                          ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """A micro-batch's share of the global-batch mean over loss tokens.

    Returns ``(sum / normalizer, {"lm loss": [sum, count]})`` with the masked sum and count of
    `per_token_loss` [b, s] under `loss_mask` [b, s]. With ``normalizer = T / (D * M)`` (T loss
    tokens in the global batch, D data-parallel ranks, M micro-batches per rank), megatron-core's
    schedule (which divides each micro-batch's loss by M) and DDP (which averages over D) produce the
    gradient of ``(total loss) / T``: the mean over every loss token of the global batch, whatever the
    micro-batch split and DP size. Each term stays mean-sized, which fp16 loss scaling needs. The
    report is summed over micro-batches and ranks before dividing, so the logged loss is that mean.
    """
    mask = loss_mask.to(per_token_loss.device).float()  # [b, s]
    total = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    return total / normalizer, {"lm loss": torch.stack([total.detach(), count.detach()])}
