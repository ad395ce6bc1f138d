"""Model and parallel-layout configuration, and the recipes of docs/DESIGN.md section 2.

``ConanModelConfig`` says what the network is; ``ParallelConfig`` says how it is split over
processes. ``models/transformer_config.py`` combines them into megatron-core's ``TransformerConfig``,
which the rest of the stack holds (its fields are not re-declared here beyond the architecture a
recipe fixes; anything else goes through ``transformer_overrides``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from megatron_conan.config.loader import config_dataclass
from megatron_conan.errors import ConfigError

Positive = Annotated[int, Field(ge=1)]
"""A count or size that must be at least 1."""

Pooling = Literal["mean", "last", "first"]
POOLING_MODES = typing.get_args(Pooling)
"""How an embedder pools a text's hidden states (``models/pooling.py``); ``embedding.pooling`` and the
export take one of these."""


@config_dataclass("model")
class ConanModelConfig:
    """Architecture of a Conan decoder (GQA, SwiGLU, RMSNorm, RoPE, no biases, tied embeddings)."""

    num_layers: Positive
    """Transformer layers."""
    hidden_size: Positive
    """Model width."""
    num_attention_heads: Positive
    """Query heads."""
    num_query_groups: Positive
    """Key/value heads (GQA groups); equal to num_attention_heads for plain multi-head attention."""
    ffn_hidden_size: Positive
    """Inner width of the SwiGLU feed-forward (each of the gate and up projections)."""
    vocab_size: Positive
    """Tokenizer vocabulary; padded up for tensor parallelism by `padded_vocab_size`."""
    max_sequence_length: Positive
    """Longest context the model is built for (RoPE tables)."""
    head_dim: Optional[int] = None
    """Per-head width; defaults to hidden_size // num_attention_heads."""
    rotary_base: float = 1_000_000.0
    """RoPE base frequency."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    embedding_init_method_std: Optional[float] = None
    """Standard deviation of the word-embedding initialisation (None: `init_method_std`). A larger
    value starts the residual stream as a bag of distinct token vectors that the layers add to
    rather than drown (docs/LEARNING.md section 5 measures what this does for a small model)."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding unit (times the tensor-parallel size), as in Megatron-LM."""

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @model_validator(mode="after")
    def _heads_split(self) -> "ConanModelConfig":
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_query_groups ({self.num_query_groups})")
        return self

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Vocabulary rounded up so that every tensor-parallel shard has the same aligned size."""
        unit = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / unit) * unit)

    def num_parameters(self, tensor_parallel: int = 1, include_embedding: bool = True) -> int:
        """Closed-form parameter count (embeddings counted once when tied)."""
        h, d = self.hidden_size, self.head_dim
        qkv = h * d * (self.num_attention_heads + 2 * self.num_query_groups)
        proj = self.num_attention_heads * d * h
        mlp = h * 2 * self.ffn_hidden_size + self.ffn_hidden_size * h
        norms = 2 * h
        per_layer = qkv + proj + mlp + norms
        total = self.num_layers * per_layer + h  # + final norm
        if include_embedding:
            embedding = self.padded_vocab_size(tensor_parallel) * h
            total += embedding if self.tie_embeddings else 2 * embedding
        return total


@config_dataclass("parallel")
class ParallelConfig:
    """How the model and the batch are split over processes."""

    tensor_parallel: Positive = 1
    """Tensor-parallel size (splits heads, KV groups, FFN and vocabulary)."""
    pipeline_parallel: Positive = 1
    """Pipeline stages (splits layers)."""
    virtual_pipeline_parallel: Optional[int] = None
    """Model chunks per pipeline stage (interleaved 1F1B); None for plain 1F1B."""
    sequence_parallel: bool = False
    """Split layer norms and dropout along the sequence over the TP group (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """Seconds the rendezvous and any collective wait for the other ranks before failing, in every
    process group: a lost node then ends the job (``srun --kill-on-bad-exit``) instead of hanging it.
    Raise it when a checkpoint save or load keeps ranks waiting longer."""

    @model_validator(mode="after")
    def _needs(self) -> "ParallelConfig":
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("sequence_parallel needs tensor_parallel > 1")
        if self.virtual_pipeline_parallel is not None and self.pipeline_parallel < 2:
            raise ValueError("virtual_pipeline_parallel needs pipeline_parallel > 1")
        return self

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel size for a world size; raises if the layout does not divide it."""
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world_size % model_parallel != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor_parallel * "
                f"parallel.pipeline_parallel = {self.tensor_parallel} * {self.pipeline_parallel}"
            )
        return world_size // model_parallel

    def validate_for_model(self, model: ConanModelConfig) -> None:
        """Check that this layout can split `model`; the error names the offending field."""
        problem = self.split_problem(model)
        if problem:
            raise ConfigError(problem)

    def split_problem(self, model: ConanModelConfig) -> Optional[str]:
        """Why this layout cannot split `model` (naming the fields in full), or None."""
        tp, pp, vpp = self.tensor_parallel, self.pipeline_parallel, self.virtual_pipeline_parallel
        for name, why in (("num_attention_heads", ""), ("num_query_groups", ": each TP rank must hold whole KV groups"),
                          ("ffn_hidden_size", "")):
            if getattr(model, name) % tp != 0:
                return f"model.{name} ({getattr(model, name)}) is not divisible by parallel.tensor_parallel ({tp}){why}"
        if model.num_layers % (pp * (vpp or 1)) != 0:
            return (f"model.num_layers ({model.num_layers}) is not divisible by parallel.pipeline_parallel ({pp})"
                    + (f" * parallel.virtual_pipeline_parallel ({vpp})" if vpp else ""))
        return None


Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = typing.get_args(Precision)
Recompute = Literal["none", "selective", "full"]
"""Activation recomputation: none, the attention core, every layer."""
RECOMPUTE_MODES = typing.get_args(Recompute)


def conan_1p4b() -> ConanModelConfig:
    """The paper's Conan-1.4B: 8 layers, 3584 wide, 32 heads over 8 KV groups (~1.50B parameters)."""
    return ConanModelConfig(
        num_layers=8,
        hidden_size=3584,
        num_attention_heads=32,
        num_query_groups=8,
        head_dim=112,
        ffn_hidden_size=8192,
        vocab_size=150_000,
        max_sequence_length=32_768,
        rotary_base=1_000_000.0,
    )


def tiny() -> ConanModelConfig:
    """Same family (everything but the sizes is Conan-1.4B's), small enough for CPU tests: splits over
    TP 1/2/4 and PP 1/2/4."""
    return dataclasses.replace(conan_1p4b(), num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                               head_dim=8, ffn_hidden_size=160, vocab_size=512, max_sequence_length=256)


MODEL_RECIPES = {"conan_1p4b": conan_1p4b, "tiny": tiny}
ModelRecipe = Literal["conan_1p4b", "tiny"]
"""The names of MODEL_RECIPES, as a config field's type."""


def model_recipe(name: str) -> ConanModelConfig:
    """A named model recipe (``conan_1p4b`` or ``tiny``)."""
    if name not in MODEL_RECIPES:
        raise ConfigError(f"unknown model recipe {name!r}; known: {sorted(MODEL_RECIPES)}")
    return MODEL_RECIPES[name]()
