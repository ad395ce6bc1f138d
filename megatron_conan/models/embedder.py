"""The Conan embedder: the decoder without its output layer, pooled and L2-normalised.

The embedding stages keep the model a megatron-core ``GPTModel`` (so a stage-3 run loads the SFT
checkpoint, and conversion sees one set of keys); embedding is a way of *calling* it::

    emb = embed(model, input_ids, lengths, pooling="mean")     # [b, h] float32, unit norm

Inputs are right-padded token ids [b, s] with their true lengths [b]. The attention layers see a
key-padding mask ([b, 1, 1, s], True = padded key): the soft-mask core attention
(``ops/soft_mask_attention``) turns it into lengths, so padded keys are never attended to whatever
a(t) is, and a = 0 is exactly causal, a = 1 exactly bidirectional. The default ``DotProductAttention``
would take the same mask *instead of* its causal mask, which is why embedding models are always built
with the soft-mask core attention (``SoftMaskConfig.causal()`` for a causal embedder).

Packing (``max_tokens_per_row > 0``): the texts are laid back to back into rows of that many tokens
(``models/packing.py``) and the model runs on them as one sequence with megatron-core's packed
parameters: RoPE takes each token's position in its own text (`_rotary_by_position`) and the
soft-mask attention is block-diagonal; the hidden states come back in the padded [s, b, h] layout, so
pooling is the same code and a text's embedding equals its padded one.

Parallelism: under tensor parallelism every TP rank computes the same hidden states (the row-parallel
layers all-reduce), so every TP rank returns the same embedding. With sequence parallelism the
decoder's output is split along the sequence over the TP group; it is gathered here with a backward
that keeps each rank's own slice (not megatron's default reduce-scatter): the pooled loss is computed
identically on every TP rank, so summing their gradients would count it TP times. Pipeline
parallelism is not supported for embedding: a contrastive loss couples the whole batch, which the
pipeline schedule's per-micro-batch losses cannot express (the stages refuse it in their config).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from megatron_conan.config.model import POOLING_MODES
from megatron_conan.models.packing import pack_batch
from megatron_conan.models.pooling import pool
from megatron_conan.models.sharding import unwrap


def key_padding_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[b, 1, 1, s] bool, True where position >= length (a padded key)."""
    positions = torch.arange(seq_len, device=lengths.device)
    return (positions[None, :] >= lengths[:, None])[:, None, None, :]


@contextlib.contextmanager
def _without_output_layer(model: torch.nn.Module) -> Iterator[None]:
    """Make ``GPTModel.forward`` return the decoder output (final norm applied) instead of logits.

    megatron-core's GPTModel returns the decoder's hidden states when ``post_process`` is False; the
    final norm belongs to the decoder block, which keeps its own flag, so flipping the model's flag
    for the call skips only the output layer. (megatron-core 0.16 has no public switch for this.)
    """
    gpt = unwrap(model)
    if not hasattr(gpt, "post_process") or not hasattr(gpt, "decoder"):
        raise TypeError(f"expected a megatron-core GPTModel (possibly wrapped), got {type(gpt).__name__}")
    if not gpt.post_process:
        raise ValueError("embedding needs the last pipeline stage's model (with the final norm): "
                         "pipeline parallelism is not supported for embedding")
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = True


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [s, b, h] of right-padded `input_ids` [b, s], full sequence on every
    TP rank. `model` is a GPTModel or its DDP / Float16Module wrapper (called through the wrapper, so
    mixed precision and gradient hooks apply)."""
    if input_ids.dim() != 2 or lengths.shape != input_ids.shape[:1]:
        raise ValueError(f"input_ids must be [b, s] and lengths [b]; got {tuple(input_ids.shape)} "
                         f"and {tuple(lengths.shape)}")
    config = unwrap(model).config
    batch, seq_len = input_ids.shape
    padded_len = seq_len
    if config.sequence_parallel:
        # the sequence is split over the TP ranks: pad it to a multiple of TP (masked keys, and
        # rows that pooling never reads)
        tp = config.tensor_model_parallel_size
        padded_len = -(-seq_len // tp) * tp
        input_ids = torch.nn.functional.pad(input_ids, (0, padded_len - seq_len))
    position_ids = torch.arange(padded_len, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    with _without_output_layer(model):
        hidden = model(input_ids=input_ids, position_ids=position_ids,
                       attention_mask=key_padding_mask(lengths, padded_len))  # [s(/tp), b, h]
    return _full_sequence(hidden, config)[:seq_len]  # [s, b, h]


@contextlib.contextmanager
def _rotary_by_position(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Make megatron-core's RoPE module return the frequencies of `positions` [t] (each packed
    token's position in its own text) instead of those of 0 .. n-1.

    Every layer then rotates the flattened rows in one call. megatron-core 0.16 has no way to pass
    per-token positions to RoPE; its thd layout restarts them per text by slicing the frequencies
    text by text in Python, for q and k of every layer."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    modules = [module for module in unwrap(model).modules() if isinstance(module, RotaryEmbedding)]
    if not modules:
        raise TypeError("packed rows need a RoPE model (megatron-core RotaryEmbedding)")
    handles = [module.register_forward_hook(lambda _module, _args, freqs: freqs[positions]) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _full_sequence(hidden: torch.Tensor, config) -> torch.Tensor:
    if not config.sequence_parallel:
        return hidden
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)


def packed_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor,
                         max_tokens_per_row: int) -> torch.Tensor:
    """`hidden_states` computed on packed rows of `max_tokens_per_row` tokens: the same [s, b, h]
    (s = the longest text; positions past a text's length hold its last token again)."""
    config = unwrap(model).config
    if input_ids.dim() != 2 or lengths.shape != input_ids.shape[:1]:
        raise ValueError(f"input_ids must be [b, s] and lengths [b]; got {tuple(input_ids.shape)} "
                         f"and {tuple(lengths.shape)}")
    # sequence parallelism splits the flattened rows over the TP ranks: whole rows of a multiple of TP
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    packed = pack_batch(input_ids, lengths, max_tokens_per_row, multiple_of=tp)
    with _without_output_layer(model), _rotary_by_position(model, packed.position_ids[0]):
        hidden = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                       packed_seq_params=packed.params)  # [t(/tp), 1, h]
    hidden = _full_sequence(hidden, config)[:, 0]  # [t, h]
    return hidden[packed.token_index]  # [s, b, h]


def embed(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor, pooling: str = "mean",
          normalize: bool = True, starts: Optional[torch.Tensor] = None, max_tokens_per_row: int = 0) -> torch.Tensor:
    """Embeddings [b, h] (float32 or wider, L2-normalised unless asked not to be). `starts` [b]:
    leading prompt tokens that attend and are attended to but are left out of the pooling.
    `max_tokens_per_row` > 0: run on packed rows of that many tokens (0: right-padded)."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    if max_tokens_per_row > 0:
        hidden = packed_hidden_states(model, input_ids, lengths, max_tokens_per_row)
    else:
        hidden = hidden_states(model, input_ids, lengths)
    return pool(hidden, lengths, pooling, normalize=normalize, starts=starts)
