"""The Conan decoder as a megatron-core ``GPTModel`` built from our own layer spec.

The spec says what the model is (pre-norm GQA self-attention with RoPE, SwiGLU MLP, RMSNorm, no
biases); parallelism lives elsewhere (``megatron_conan.distributed``). The core-attention slot is
pluggable: the soft-mask kernel of stage 3 drops in there without touching anything else.

With Transformer Engine installed the spec uses its fused norm+linear layers and attention; without
it, megatron-core's local layers (``models/local_layers.py``: the same layers minus two per-call
costs) and our sequence-parallel-capable :class:`ConanRMSNorm`.
"""

from __future__ import annotations

from typing import Optional, Union

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_conan.config.model import ConanModelConfig
from megatron_conan.models.local_layers import ConanColumnParallelLinear, ConanMLP, ConanRowParallelLinear
from megatron_conan.ops.engines import transformer_engine_available
from megatron_conan.ops.norms import ConanRMSNorm

CoreAttention = Union[type, ModuleSpec]


def _layer_spec(norm, linear_qkv, core_attention: CoreAttention, linear_proj, mlp: Union[type, ModuleSpec]) -> ModuleSpec:
    """One pre-norm layer: `norm` before attention and before the MLP (IdentityOp where the norm is
    fused into the following linear layer), GQA self-attention, a SwiGLU MLP, no biases."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_qkv,
                    core_attention=core_attention,
                    linear_proj=linear_proj,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _local_layer_spec(core_attention: CoreAttention) -> ModuleSpec:
    # ConanMLP as a class, not a ModuleSpec: megatron-core's layer passes its TP group only to an MLP
    # spec of exactly its own class and logs a warning for any other; the class builds its own local
    # linear layers on the model-parallel TP group, which is the layer's
    return _layer_spec(ConanRMSNorm, ConanColumnParallelLinear, core_attention, ConanRowParallelLinear, ConanMLP)


def _transformer_engine_layer_spec(core_attention: Optional[CoreAttention]) -> ModuleSpec:
    """TE spec: the pre-attention and pre-MLP norms fuse into the following linear layers."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                                          linear_fc2=TERowParallelLinear))
    return _layer_spec(IdentityOp, TELayerNormColumnParallelLinear, core_attention or TEDotProductAttention,
                       TERowParallelLinear, mlp)


def conan_block_spec(
    config: TransformerConfig,
    core_attention: Optional[CoreAttention] = None,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> ModuleSpec:
    """Spec of this pipeline stage's transformer block (its layers and the final norm).

    Args:
        core_attention: module class or ModuleSpec for the attention kernel slot; default
            megatron-core's ``DotProductAttention`` (or TE's ``TEDotProductAttention``).
        use_transformer_engine: force the TE or the local spec; default: TE when installed.
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        layer_spec = _transformer_engine_layer_spec(core_attention)
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        layer_spec = _local_layer_spec(core_attention or DotProductAttention)
        final_norm = ConanRMSNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm),
    )


def build_conan_model(
    model_config: ConanModelConfig,
    transformer_config: TransformerConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    core_attention: Optional[CoreAttention] = None,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """Build this rank's part of the Conan model (model-parallel groups must be initialised).

    ``pre_process`` / ``post_process`` default to whether this rank holds the first / last
    pipeline stage (for ``vp_stage``, the first / last model chunk).
    """
    from megatron.core import parallel_state

    tp = transformer_config.tensor_model_parallel_size
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    spec = conan_block_spec(
        transformer_config, core_attention=core_attention,
        use_transformer_engine=use_transformer_engine, vp_stage=vp_stage,
    )
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        vocab_size=model_config.padded_vocab_size(tp),
        max_sequence_length=model_config.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model_config.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model_config.rotary_base),
        rotary_percent=1.0,
        vp_stage=vp_stage,
    )


def build_model_chunks(
    model_config: ConanModelConfig,
    transformer_config: TransformerConfig,
    core_attention: Optional[CoreAttention] = None,
    use_transformer_engine: Optional[bool] = None,
) -> list:
    """All model chunks this rank holds: one, or `virtual_pipeline_parallel` for interleaving."""
    vpp = transformer_config.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    return [
        build_conan_model(model_config, transformer_config, core_attention=core_attention,
                          use_transformer_engine=use_transformer_engine, vp_stage=stage)
        for stage in stages
    ]
