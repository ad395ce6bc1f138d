"""Move Conan weights (or gradients) between any TP/PP layout and one full, unsharded state dict.

The *full* state dict uses the key names of a TP=1, PP=1 model (``decoder.layers.{global}.…``) and
holds exactly ``vocab_size`` embedding rows (no TP padding). It is what Hugging Face conversion
maps from, and what layout-parity tests compare. Every rank calls these functions collectively.

Layout facts handled here:
- tensor-parallel parameters carry ``partition_dim``; shards concatenate along it, except
- SwiGLU ``linear_fc1``: each TP rank holds ``[gate_r; up_r]``, so the full weight is
  ``[gate_0 … gate_{t-1}; up_0 … up_{t-1}]``;
- GQA ``linear_qkv`` shards are whole query groups, so they concatenate directly;
- with PP > 1 and tied embeddings the last stage keeps a copy of the word embeddings as
  ``output_layer.weight``, kept equal by megatron-core; it is not part of the full dict.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_conan.config.model import ConanModelConfig
from megatron_conan.distributed.device import current_placement

_EMBEDDING_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def unwrap(module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(module, GPTModel):
        if not hasattr(module, "module"):
            raise TypeError(f"expected a (wrapped) GPTModel, got {type(module).__name__}")
        module = module.module
    return module


def _global_name(model: GPTModel, local_name: str) -> str:
    """Rename ``decoder.layers.{local}.`` to the global layer index of this pipeline stage."""
    if not local_name.startswith("decoder.layers."):
        return local_name
    _, _, index, rest = local_name.split(".", 3)
    layer = model.decoder.layers[int(index)]
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def _is_gated_fc1(name: str, model: GPTModel) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit


def _local_tensor(param: torch.nn.Parameter, source: str) -> Optional[torch.Tensor]:
    if source == "param":
        return param.detach()
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    return None if grad is None else grad.detach()


def _gather_tp(name: str, model: GPTModel, param: torch.nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return local.clone()
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(local) for _ in range(tp_size)]
    current_placement().all_gather(shards, local.contiguous(), group=group)
    dim = param.partition_dim
    if _is_gated_fc1(name, model):
        gates = [s.chunk(2, dim=0)[0] for s in shards]
        ups = [s.chunk(2, dim=0)[1] for s in shards]
        return torch.cat(gates + ups, dim=0)
    return torch.cat(shards, dim=dim)


def gather_full_state_dict(
    model_chunks: Iterable[torch.nn.Module],
    model_config: ConanModelConfig,
    source: str = "param",
) -> Dict[str, torch.Tensor]:
    """Full (TP1/PP1-named, unpadded) weights or gradients, on every rank, as fp32 CPU tensors.

    Args:
        source: ``"param"`` for weights, ``"grad"`` for gradients (``main_grad`` when megatron's
            DDP holds them, else ``.grad``).
    """
    if source not in ("param", "grad"):
        raise ValueError(f"source must be 'param' or 'grad', got {source!r}")
    local_full: Dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        model = unwrap(chunk)
        for local_name, param in model.named_parameters():
            if local_name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                continue  # the tied copy on the last stage
            tensor = _local_tensor(param, source)
            if tensor is None:
                raise RuntimeError(f"{local_name} has no gradient to gather")
            full = _gather_tp(local_name, model, param, tensor).float().cpu()
            if local_name in _EMBEDDING_KEYS:
                full = full[: model_config.vocab_size]
            local_full[_global_name(model, local_name)] = full
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return local_full
    stages: List[Dict[str, torch.Tensor]] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    current_placement().all_gather_object(stages, local_full, group=parallel_state.get_pipeline_model_parallel_group())
    merged: Dict[str, torch.Tensor] = {}
    for stage in stages:
        merged.update(stage)
    return merged


def _shard_for_this_rank(name: str, model: GPTModel, param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    rank = parallel_state.get_tensor_model_parallel_rank()
    if _is_gated_fc1(name, model):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[rank], up.chunk(tp_size, dim=0)[rank]], dim=0)
    return full.chunk(tp_size, dim=param.partition_dim)[rank]


def load_full_state_dict(
    model_chunks: Iterable[torch.nn.Module],
    full_state_dict: Dict[str, torch.Tensor],
    model_config: ConanModelConfig,
) -> None:
    """Copy a full state dict into this rank's shards. Missing or mis-shaped keys raise."""
    embedding = full_state_dict.get("embedding.word_embeddings.weight")
    for chunk in model_chunks:
        model = unwrap(chunk)
        for local_name, param in model.named_parameters():
            name = _global_name(model, local_name)
            if local_name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                source = embedding
            else:
                source = full_state_dict.get(name)
            if source is None:
                raise KeyError(f"full state dict has no entry for {name}")
            if local_name in _EMBEDDING_KEYS:
                padded_rows = model_config.padded_vocab_size(parallel_state.get_tensor_model_parallel_world_size())
                if source.shape[0] != model_config.vocab_size:
                    raise ValueError(
                        f"{name}: {source.shape[0]} rows, model vocab_size is {model_config.vocab_size}"
                    )
                source = torch.cat([source, source.new_zeros(padded_rows - source.shape[0], source.shape[1])])
            shard = _shard_for_this_rank(local_name, model, param, source)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: shard shape {tuple(shard.shape)} != parameter {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(shard.to(param.dtype))
