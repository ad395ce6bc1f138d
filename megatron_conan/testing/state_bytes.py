"""What a built rank really holds, for checking the dry run's figures against megatron-core.

:func:`layout_state_body` runs inside :func:`megatron_conan.testing.distributed.run_distributed`: for
each layout in turn it builds the model, megatron-core's DDP and optimizer exactly as the trainer
does (``wrap_model``, ``build_optimizer``), takes one optimizer step (Adam allocates its moments on
the first step) and reports the bytes of the rank's tensors (:func:`measured_state_bytes`); rank 0
also counts one forward and backward with ``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megatron_conan.config.model import ConanModelConfig, ParallelConfig


@dataclass
class StateLayout:
    """One layout and precision to build, on the world the body runs in."""

    parallel: ParallelConfig
    precision: str = "bf16"
    model_overrides: Dict[str, object] = field(default_factory=dict)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def measured_state_bytes(chunks, optimizer) -> Dict[str, int]:
    """Bytes this rank allocated for ``weights`` (the parameters, or megatron-core's parameter
    buffer where the distributed optimizer made one), ``gradients`` (the DDP ``main_grad``
    buffers) and ``optimizer`` (fp32 main copies that are not the model's own tensors, and Adam's
    ``exp_avg`` / ``exp_avg_sq``), plus ``parameters`` (elements of the model's parameters)."""
    weights = gradients = parameters = 0
    model_storages = set()
    for chunk in chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            gradients += buffer.grad_data.numel() * buffer.grad_data.element_size()
            if buffer.param_data is not None:
                weights += buffer.param_data.numel() * buffer.param_data.element_size()
            else:
                weights += sum(param.numel() * param.element_size() for param in buffer.params)
        for param in chunk.parameters():
            parameters += param.numel()
            model_storages.add(_storage(param))
    optimizer_bytes = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                if _storage(param) not in model_storages:  # an fp32 main copy
                    optimizer_bytes += param.numel() * param.element_size()
                state = inner.optimizer.state.get(param, {})
                optimizer_bytes += sum(state[key].numel() * state[key].element_size()
                                       for key in ("exp_avg", "exp_avg_sq") if key in state)
    return {"parameters": parameters, "weights": weights, "gradients": gradients, "optimizer": optimizer_bytes}


def _counted_flops(chunks, model_config: ConanModelConfig, batch: int, seq_length: int) -> int:
    """FLOPs ``FlopCounterMode`` counts for one forward and backward of the unwrapped model."""
    from torch.utils.flop_counter import FlopCounterMode

    module = chunks[0].module
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_config.vocab_size, (batch, seq_length), generator=generator)
    positions = torch.arange(seq_length).expand(batch, seq_length)
    with FlopCounterMode(display=False) as counter:
        loss = module(tokens, positions, None, labels=tokens)  # [b, s] per-token losses
        loss.float().sum().backward()
    return counter.get_total_flops()


def layout_state_body(rank: int, world_size: int, model_config: ConanModelConfig, layouts: List[StateLayout],
                      flops_shape: Optional[tuple] = None) -> dict:
    """run_distributed body: each layout's measured bytes on this rank, and (rank 0, first layout,
    when `flops_shape` = (batch, seq_length) is given) the counted FLOPs of one forward and backward."""
    import dataclasses

    from megatron_conan.config.run import OptimizerSection
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.models.transformer_config import build_transformer_config
    from megatron_conan.training.megatron_step import build_optimizer, optimizer_step, wrap_model, zero_grads

    measured, flops = [], None
    for index, layout in enumerate(layouts):
        config = dataclasses.replace(model_config, **layout.model_overrides)
        initialize_model_parallel(layout.parallel)
        transformer_config = build_transformer_config(config, layout.parallel, precision=layout.precision)
        distributed = layout.parallel.use_distributed_optimizer
        chunks = wrap_model(build_model_chunks(config, transformer_config), transformer_config,
                            use_distributed_optimizer=distributed)
        optimizer = build_optimizer(chunks, transformer_config, OptimizerSection(lr=1e-3),
                                    use_distributed_optimizer=distributed)
        zero_grads(chunks, optimizer)
        optimizer_step(optimizer)
        measured.append(measured_state_bytes(chunks, optimizer))
        if index == 0 and rank == 0 and flops_shape is not None:
            flops = _counted_flops(chunks, config, *flops_shape)
    return {"measured": measured, "flops": flops}
