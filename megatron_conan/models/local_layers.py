"""megatron-core's local (non-Transformer-Engine) linear and MLP layers, minus two per-call costs.

The local spec is what runs on the CPU (tests, the main job) and on a GPU without Transformer Engine.
At the main job's width (hidden 128) a layer's matrix products take a few milliseconds, so fixed
per-call work shows in every step and every encoded batch:

- ``ConanMLP``: megatron-core's unfused gated path computes ``silu(gate) * (up + glu_linear_offset)``,
  a full extra pass over the [tokens, ffn] activations (and its backward) to add an offset that is
  0.0 for SwiGLU. Here ``silu(gate) * up``: the same values (x + 0.0 == x), one pass fewer.
- ``ConanColumnParallelLinear`` / ``ConanRowParallelLinear``: with gradients off (encoding,
  GradCache's first pass, evaluation) the product skips megatron-core's autograd Function, which
  only exists to schedule the backward's communication; the same ``matmul(x, w.t())``, so the same
  bits. With sequence parallelism the column layer gathers its input inside that Function, so that
  case keeps it.

The subclasses keep megatron-core's parameters, state-dict keys and sharded-checkpoint layout, and
fall back to megatron-core's own forward for any configuration they do not cover (another
activation, clamping, a non-zero offset, per-token scales, fused activations).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules


def _product_without_autograd(input, weight, bias, sequence_parallel: bool):
    """megatron-core's forward product when nothing needs its Function, else None."""
    if torch.is_grad_enabled() or sequence_parallel:
        return None
    output = torch.matmul(input, weight.t())
    return output if bias is None else output + bias


class _NoGradProduct:
    """Mixed in before a megatron-core parallel linear layer: its no-grad product skips the
    autograd Function (same maths). megatron-core calls ``_forward_impl`` with keyword arguments."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        output = _product_without_autograd(input, weight, kwargs.get("bias"), kwargs.get("sequence_parallel", True))
        return output if output is not None else super()._forward_impl(input, weight, *args, **kwargs)


class ConanColumnParallelLinear(_NoGradProduct, ColumnParallelLinear):
    """ColumnParallelLinear whose no-grad product skips the autograd Function."""


class ConanRowParallelLinear(_NoGradProduct, RowParallelLinear):
    """RowParallelLinear whose no-grad product skips the autograd Function; the all-reduce (or
    reduce-scatter) that follows it is megatron-core's, unchanged."""


class ConanMLP(MLP):
    """MLP whose plain SwiGLU (SiLU, no clamp, zero offset, unfused; fc1's bias, if any, added
    first as megatron-core does) skips the offset pass.

    Built from the layer spec as a class: its linear layers default to the local ones above, its
    width to the config's, and its TP group to the model-parallel one."""

    def __init__(self, config, submodules: Optional[MLPSubmodules] = None, is_expert: bool = False,
                 input_size: Optional[int] = None, ffn_hidden_size: Optional[int] = None, tp_group=None):
        submodules = submodules or MLPSubmodules(linear_fc1=ConanColumnParallelLinear,
                                                 linear_fc2=ConanRowParallelLinear)
        super().__init__(config, submodules, is_expert=is_expert, input_size=input_size,
                         ffn_hidden_size=ffn_hidden_size or config.ffn_hidden_size, tp_group=tp_group)
        # decided once: the config does not change after the model is built
        self.plain_swiglu = (config.gated_linear_unit and self.activation_func is torch.nn.functional.silu
                             and not config.use_te_activation_func and not config.bias_activation_fusion
                             and config.activation_func_clamp_value is None and config.glu_linear_offset == 0.0)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None or not self.plain_swiglu:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)  # [s, b, 2 * ffn / tp]
        if bias is not None:
            intermediate = intermediate + bias
        gate, up = torch.chunk(intermediate, 2, dim=-1)
        return self.linear_fc2(torch.nn.functional.silu(gate) * up)
