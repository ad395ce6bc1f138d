"""``ConanModelConfig`` <-> Hugging Face ``LlamaConfig`` (config.json), both directions.

What a Llama config must say to be a Conan model, and how we write it so that both current and older
transformers read it the same: ``head_dim`` always written (a shape whose head width is not
hidden / heads needs it), GQA as ``num_key_value_heads``, no biases, SwiGLU (``silu``), RMSNorm
epsilon, tied embeddings, and the RoPE base twice: as ``rope_parameters`` (transformers >= 5) and as
top-level ``rope_theta`` (transformers 4.x ignores ``rope_parameters``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch

from megatron_conan.config.model import ConanModelConfig
from megatron_conan.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from megatron_conan.errors import InputError

CAUSAL_LM = "LlamaForCausalLM"
BASE_MODEL = "LlamaModel"
ARCHITECTURES = (CAUSAL_LM, BASE_MODEL)
"""HF architectures the converter reads and writes; anything else is refused."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Export dtypes by their command-line names."""
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class UnsupportedModelError(InputError):
    """An HF directory holds a model this converter cannot express as a Conan model."""


def hf_config_dict(cfg: ConanModelConfig, architecture: str = CAUSAL_LM, dtype: torch.dtype = torch.float32,
                   is_causal: bool = True) -> Dict[str, Any]:
    """The config.json of `cfg` as an HF Llama model (`is_causal=False`: bidirectional attention)."""
    from transformers import LlamaConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_sequence_length,
        initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        architectures=[architecture],
    )
    values = config.to_dict()
    values["rope_theta"] = float(cfg.rotary_base)  # read by transformers 4.x
    values["dtype"] = values["torch_dtype"] = _HF_DTYPE_NAMES[dtype]  # 5.x reads dtype, 4.x torch_dtype
    if not is_causal:
        values["is_causal"] = False
    return values


def write_hf_config(values: Dict[str, Any], directory: str) -> None:
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(values, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_hf_config(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"{directory} is not a Hugging Face model directory (no config.json in it)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _rope_base(values: Dict[str, Any], where: str) -> float:
    parameters = values.get("rope_parameters") or {}
    scaling = values.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(f"{where}: RoPE type {rope_type!r} (scaled RoPE) has no Conan equivalent; "
                                    "only the default RoPE is supported")
    base = parameters.get("rope_theta", values.get("rope_theta"))
    if base is None:
        raise UnsupportedModelError(f"{where}: no RoPE base (rope_parameters.rope_theta or rope_theta)")
    return float(base)


def model_config_from_hf(values: Dict[str, Any], where: str) -> ConanModelConfig:
    """The ConanModelConfig an HF Llama config.json describes; anything else is refused by name."""
    architectures = values.get("architectures") or []
    if values.get("model_type") != "llama" or not architectures or architectures[0] not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: unknown architecture {architectures or None} (model_type {values.get('model_type')!r}); "
            f"the converter reads Llama models: {', '.join(ARCHITECTURES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if values.get(flag):
            raise UnsupportedModelError(f"{where}: {flag} is true; Conan models have no biases")
    if values.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act {values['hidden_act']!r}; Conan models use SwiGLU (silu)")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(values.get(name), int):
            raise UnsupportedModelError(f"{where}: config.json has no integer {name}")
    heads = values["num_attention_heads"]
    try:
        return ConanModelConfig(
            num_layers=values["num_hidden_layers"],
            hidden_size=values["hidden_size"],
            num_attention_heads=heads,
            num_query_groups=values.get("num_key_value_heads") or heads,
            ffn_hidden_size=values["intermediate_size"],
            vocab_size=values["vocab_size"],
            max_sequence_length=values.get("max_position_embeddings", 4096),
            head_dim=values.get("head_dim") or values["hidden_size"] // heads,
            rotary_base=_rope_base(values, where),
            norm_epsilon=values.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(values.get("tie_word_embeddings", False)),
            init_method_std=values.get("initializer_range", 0.02),
        )
    except InputError as error:
        raise UnsupportedModelError(f"{where}: {error}") from None


def hf_is_causal(values: Dict[str, Any]) -> bool:
    """What attention an HF config asks for (transformers >= 5.2 honours ``is_causal``)."""
    return bool(values.get("is_causal", True))


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
