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
