"""The Megatron <-> Hugging Face Llama key map: a table of templated keys plus two reshapes.

The Megatron side is the *full* state dict of :mod:`megatron_conan.models.sharding` (TP1/PP1 names,
``vocab_size`` embedding rows, whatever layout the checkpoint was written in); the Hugging Face side
is ``LlamaForCausalLM`` (``prefix="model."``, with ``lm_head`` when embeddings are untied) or
``LlamaModel`` (``prefix=""``, what a sentence-transformers directory holds).

Only two tensors are not a rename:
- ``linear_qkv``: megatron-core stores Q, K and V interleaved per KV group,
  ``[g0: q_0 .. q_{n-1}, k, v | g1: ...]`` (n = query heads per group), HF stores ``q_proj``,
  ``k_proj``, ``v_proj`` separately, heads in order;
- ``linear_fc1``: the full dict holds ``[gate; up]`` (sharding.py undoes the per-rank interleave),
  HF stores ``gate_proj`` and ``up_proj``.
Every key must be mapped exactly once, in both directions: a leftover key or a tensor of the wrong
shape is an error (:class:`ConversionError`), never silently dropped.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_conan.config.model import ConanModelConfig
from megatron_conan.errors import CheckpointMismatchError

LAYER = "{i}"

DIRECT_KEYS: Tuple[Tuple[str, str], ...] = (
    ("embedding.word_embeddings.weight", "embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "norm.weight"),
    ("decoder.layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.weight"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", "layers.{i}.self_attn.o_proj.weight"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", "layers.{i}.post_attention_layernorm.weight"),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", "layers.{i}.mlp.down_proj.weight"),
)
"""(Megatron key, HF key without the model prefix): the same tensor under another name."""

SPLIT_KEYS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("decoder.layers.{i}.self_attention.linear_qkv.weight",
     ("layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.k_proj.weight",
      "layers.{i}.self_attn.v_proj.weight")),
    ("decoder.layers.{i}.mlp.linear_fc1.weight",
     ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight")),
)
"""(Megatron key, HF keys): one Megatron tensor is several HF tensors (the reshapes below)."""

OUTPUT_LAYER = ("output_layer.weight", "lm_head.weight")
"""Untied models only; the HF key carries no model prefix."""

TRANSFORMER_ENGINE_ALIASES: Dict[str, str] = {
    "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight": "decoder.layers.{i}.pre_mlp_layernorm.weight",
}
"""The Transformer Engine spec fuses each pre-norm into the following linear layer: same tensors."""

IGNORED_HF_KEYS = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)
"""Buffers some older HF checkpoints store: recomputed from the config, never weights."""


class ConversionError(CheckpointMismatchError):
    """The weights do not fit the key map or the model shape (one line naming the key)."""


def _expand(template: str, layer: int) -> str:
    return template.replace(LAYER, str(layer))


def _templates_by_layer(num_layers: int, template: str) -> List[str]:
    return [_expand(template, layer) for layer in range(num_layers)] if LAYER in template else [template]


def megatron_shapes(cfg: ConanModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the full Megatron state dict of `cfg` and its shape."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    qkv_rows = d * (cfg.num_attention_heads + 2 * cfg.num_query_groups)
    per_layer = {
        "decoder.layers.{i}.input_layernorm.weight": (h,),
        "decoder.layers.{i}.self_attention.linear_qkv.weight": (qkv_rows, h),
        "decoder.layers.{i}.self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d),
        "decoder.layers.{i}.pre_mlp_layernorm.weight": (h,),
        "decoder.layers.{i}.mlp.linear_fc1.weight": (2 * f, h),
        "decoder.layers.{i}.mlp.linear_fc2.weight": (h, f),
    }
    shapes = {"embedding.word_embeddings.weight": (cfg.vocab_size, h), "decoder.final_layernorm.weight": (h,)}
    for template, shape in per_layer.items():
        for key in _templates_by_layer(cfg.num_layers, template):
            shapes[key] = shape
    if not cfg.tie_embeddings:
        shapes[OUTPUT_LAYER[0]] = (cfg.vocab_size, h)
    return shapes


# -- the two reshapes ----------------------------------------------------------------------------

def split_qkv(qkv: torch.Tensor, cfg: ConanModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's per-group interleaved [g*(n+2)*d, h] -> q [g*n*d, h], k [g*d, h], v [g*d, h]."""
    groups, d = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    grouped = qkv.reshape(groups, per_group + 2, d, qkv.shape[-1])  # [g, n+2, d, h]
    q = grouped[:, :per_group].reshape(groups * per_group * d, -1)  # [g*n*d, h]
    k = grouped[:, per_group].reshape(groups * d, -1)  # [g*d, h]
    v = grouped[:, per_group + 1].reshape(groups * d, -1)  # [g*d, h]
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ConanModelConfig) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    groups, d = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    hidden = q.shape[-1]
    grouped = torch.cat([q.reshape(groups, per_group, d, hidden), k.reshape(groups, 1, d, hidden),
                         v.reshape(groups, 1, d, hidden)], dim=1)  # [g, n+2, d, h]
    return grouped.reshape(-1, hidden)  # [g*(n+2)*d, h]


def split_gate_up(fc1: torch.Tensor, cfg: ConanModelConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """[gate; up] [2f, h] -> gate [f, h], up [f, h]."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor, cfg: ConanModelConfig) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)  # [2f, h]


_SPLITTERS: Dict[str, Tuple[Callable, Callable]] = {
    SPLIT_KEYS[0][0]: (split_qkv, merge_qkv),
    SPLIT_KEYS[1][0]: (split_gate_up, merge_gate_up),
}


# -- both directions -----------------------------------------------------------------------------

def _canonical_megatron(state: Dict[str, torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """Rename Transformer Engine spellings to the local spec's."""
    renamed = dict(state)
    for te_template, local_template in TRANSFORMER_ENGINE_ALIASES.items():
        for layer in range(num_layers):
            te_key = _expand(te_template, layer)
            if te_key in renamed:
                renamed[_expand(local_template, layer)] = renamed.pop(te_key)
    return renamed


def _check_shape(key: str, tensor: torch.Tensor, expected: Sequence[int], side: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ConversionError(f"{side} tensor {key} has shape {tuple(tensor.shape)}, the model config "
                              f"needs {tuple(expected)}")


def _take(state: Dict[str, torch.Tensor], key: str, side: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"{side} weights have no tensor {key}")
    return state.pop(key)


def _refuse_leftovers(state: Dict[str, torch.Tensor], side: str) -> None:
    if state:
        names = sorted(state)
        more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
        raise ConversionError(f"{side} weights have tensors the key map does not know: "
                              f"{', '.join(names[:3])}{more}")


def _as_one(tensor: torch.Tensor, cfg: ConanModelConfig) -> Tuple[torch.Tensor]:
    return (tensor,)


def _from_one(tensor: torch.Tensor, cfg: ConanModelConfig) -> torch.Tensor:
    return tensor


def expanded_keys(cfg: ConanModelConfig, prefix: str) -> Iterator[Tuple[str, Tuple[str, ...], Tuple[Callable, Callable]]]:
    """The table for `cfg`'s layers: (Megatron key, its HF keys, (split, merge)) for every tensor
    but the output layer."""
    for megatron_template, hf_template in DIRECT_KEYS:
        for layer in range(cfg.num_layers if LAYER in megatron_template else 1):
            yield _expand(megatron_template, layer), (prefix + _expand(hf_template, layer),), (_as_one, _from_one)
    for megatron_template, hf_templates in SPLIT_KEYS:
        for layer in range(cfg.num_layers):
            yield (_expand(megatron_template, layer), tuple(prefix + _expand(t, layer) for t in hf_templates),
                   _SPLITTERS[megatron_template])


def megatron_to_hf(full: Dict[str, torch.Tensor], cfg: ConanModelConfig, prefix: str = "model.",
                   include_lm_head: bool = True) -> Dict[str, torch.Tensor]:
    """HF Llama state dict of a full Megatron state dict (tensors are views where possible).

    Args:
        prefix: ``"model."`` for ``LlamaForCausalLM``, ``""`` for ``LlamaModel``.
        include_lm_head: write ``lm_head.weight`` for untied models (``LlamaForCausalLM`` only).
    """
    remaining = _canonical_megatron(full, cfg.num_layers)
    shapes = megatron_shapes(cfg)
    for key, tensor in remaining.items():
        if key in shapes:
            _check_shape(key, tensor, shapes[key], "Megatron")
    hf: Dict[str, torch.Tensor] = {}
    for megatron_key, hf_keys, (split, _) in expanded_keys(cfg, prefix):
        tensor = _take(remaining, megatron_key, "Megatron")
        hf.update(zip(hf_keys, split(tensor, cfg)))
    if not cfg.tie_embeddings:
        output = _take(remaining, OUTPUT_LAYER[0], "Megatron")
        if include_lm_head:
            hf[OUTPUT_LAYER[1]] = output
    _refuse_leftovers(remaining, "Megatron")
    return hf


def hf_shapes(cfg: ConanModelConfig, prefix: str = "model.", include_lm_head: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the HF Llama state dict of `cfg` and its shape (tied lm_head not listed)."""
    return {key: tuple(tensor.shape) for key, tensor in
            megatron_to_hf({key: torch.empty(shape, device="meta") for key, shape in megatron_shapes(cfg).items()},
                           cfg, prefix, include_lm_head).items()}


def hf_to_megatron(hf: Dict[str, torch.Tensor], cfg: ConanModelConfig, prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """Full Megatron state dict of an HF Llama state dict; inverse of :func:`megatron_to_hf`.

    A tied model's ``lm_head.weight``, when present, must equal the input embedding.
    """
    remaining = {key: tensor for key, tensor in hf.items()
                 if not any(pattern.search(key) for pattern in IGNORED_HF_KEYS)}
    expected = hf_shapes(cfg, prefix)
    for key, tensor in remaining.items():
        if key in expected:
            _check_shape(key, tensor, expected[key], "Hugging Face")
    full: Dict[str, torch.Tensor] = {}
    for megatron_key, hf_keys, (_, merge) in expanded_keys(cfg, prefix):
        parts = [_take(remaining, key, "Hugging Face") for key in hf_keys]
        full[megatron_key] = merge(*parts, cfg)
    lm_head: Optional[torch.Tensor] = remaining.pop(OUTPUT_LAYER[1], None)
    if cfg.tie_embeddings:
        embedding = full["embedding.word_embeddings.weight"]
        shapes_only = lm_head is not None and lm_head.device.type == "meta"  # a check of the headers
        if lm_head is not None and not shapes_only and not torch.equal(lm_head, embedding):
            raise ConversionError("tie_word_embeddings is true but lm_head.weight differs from "
                                  f"{prefix}embed_tokens.weight")
    else:
        if lm_head is None:
            raise ConversionError("tie_word_embeddings is false but the weights have no lm_head.weight")
        _check_shape(OUTPUT_LAYER[1], lm_head, (cfg.vocab_size, cfg.hidden_size), "Hugging Face")
        full[OUTPUT_LAYER[0]] = lm_head
    _refuse_leftovers(remaining, "Hugging Face")
    return full
