"""megatron-core's ``TransformerConfig`` of a Conan model (``ConanModelConfig``) under a parallel layout
(``ParallelConfig``): the architecture of docs/DESIGN.md section 1 in megatron-core's terms."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_conan.config.model import PRECISIONS, ConanModelConfig, ParallelConfig
from megatron_conan.errors import ConfigError


def build_transformer_config(
    model: ConanModelConfig,
    parallel: ParallelConfig,
    precision: str = "fp32",
    use_cpu_initialization: Optional[bool] = None,
    transformer_overrides: Optional[Dict[str, Any]] = None,
):
    """megatron-core ``TransformerConfig`` for this model and layout.

    Fusions that need CUDA kernels (bias/activation, masked softmax, RoPE, gradient-accumulation)
    are enabled only when CUDA is present; on CPU they would cost ~20 s of torch.compile per run.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    parallel.validate_for_model(model)
    on_gpu = torch.cuda.is_available()
    if use_cpu_initialization is None:
        use_cpu_initialization = not on_gpu
    kwargs: Dict[str, Any] = {**_architecture(model),
                              **_layout_and_precision(parallel, precision, use_cpu_initialization, on_gpu)}
    kwargs.update(_checked_overrides(transformer_overrides))
    return TransformerConfig(**kwargs)


def _architecture(model: ConanModelConfig) -> Dict[str, Any]:
    """The network of docs/DESIGN.md section 2: GQA, SwiGLU, RMSNorm, no biases, no dropout."""
    return dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        layernorm_epsilon=model.norm_epsilon,
        init_method_std=model.init_method_std,
        embedding_init_method_std=model.embedding_init_method_std,
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def _layout_and_precision(parallel: ParallelConfig, precision: str, use_cpu_initialization: bool,
                          on_gpu: bool) -> Dict[str, Any]:
    """The split over processes, the dtypes, and the fusions and communication of this machine."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return dict(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        params_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        pipeline_dtype=dtype,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # gloo's batched isend/irecv mixes up micro-batches under the interleaved schedule (the
        # loss drifts by ~2e-3); separate sends are exact. NCCL batches correctly.
        batch_p2p_comm=on_gpu,
        batch_p2p_sync=on_gpu,  # the sync is a torch.cuda.synchronize()
        deallocate_pipeline_outputs=on_gpu,
    )


def _checked_overrides(transformer_overrides: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``model.transformer_overrides`` (and the stage's), refused when a field is not TransformerConfig's."""
    overrides = dict(transformer_overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TransformerConfig)}
    if unknown:
        raise ConfigError(f"model.transformer_overrides has unknown TransformerConfig fields: {sorted(unknown)}")
    return overrides
