"""RMSNorm that works with megatron-core sequence parallelism on the local (non-TE) spec.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``; Apex / Transformer Engine
norms accept it but are optional here. Under sequence parallelism every tensor-parallel rank
normalises a different slice of the sequence with the *same* weight, so each rank's weight gradient
is partial: marking the parameter ``sequence_parallel`` makes megatron-core's
``finalize_model_grads`` all-reduce it over the tensor-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class ConanRMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back.

    Takes megatron-core's norm constructor arguments so it can stand in any layer-spec norm slot.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"ConanRMSNorm requires config.normalization='RMSNorm', got {config.normalization!r}"
            )
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("ConanRMSNorm does not implement layernorm_zero_centered_gamma")
        self.eps = eps
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        self.sequence_parallel = config.sequence_parallel
        # Read by megatron-core's finalize_model_grads: all-reduce this grad over the TP group.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel computes x * rsqrt(mean(x^2) + eps) * weight, the same float32 maths as
        # writing it out (equal bit for bit on CPU), in one pass instead of five
        normed = torch.nn.functional.rms_norm(hidden_states.float(), (hidden_states.shape[-1],),
                                              self.weight.float(), self.eps)
        return normed.to(hidden_states.dtype)
