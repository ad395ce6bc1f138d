"""Soft-mask attention as megatron-core's `core_attention` (the slot DotProductAttention fills).

    spec.submodules.self_attention.submodules.core_attention = soft_mask_core_attention_spec(cfg)

megatron-core hands this module q [sq, b, np, hn] and k, v [sk, b, ng, hn] with np, ng the heads of
this tensor-parallel rank (heads are independent, so TP needs nothing else), and expects
[sq, b, np * hn] back. The trainer moves a(t) with `set_soft_mask_step(model, step)`; the progress
is checkpointed with `get_soft_mask_state` / `load_soft_mask_state`.

attention_mask: None (every sequence has full length) or a bool key-padding mask broadcastable as
[b, 1, 1, s] with True = padded key, right padding only. Anything else raises.

Packed rows (``models/packing.py``): megatron-core passes q, k, v of the flattened rows, sbhd
[t, 1, heads, hn] (what the embedder sends) or thd [t, heads, hn], with ``packed_seq_params`` (a
``PackedRows``: cu_seqlens, their padded offsets and the row width); the flattened sequence is cut
back into rows of that width and the texts become key windows, so the attention is block-diagonal
and the soft mask applies within each text.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Union

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from .function import resolve_backend, soft_mask_attention
from .reference import key_windows_from_cu_seqlens
from .schedule import SoftMaskConfig, SoftMaskSchedule
from .text_buckets import TextBuckets, plan_text_buckets


def lengths_from_key_padding_mask(attention_mask: Optional[torch.Tensor], batch: int, seq_len: int,
                                  device: torch.device) -> torch.Tensor:
    """True lengths, int32 [b], from a right-padding key mask (True = padded) or None."""
    if attention_mask is None:
        return torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    if attention_mask.dtype != torch.bool:
        raise ValueError(f"soft-mask attention takes a bool key-padding mask (True = padded), got "
                         f"dtype {attention_mask.dtype}")
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() == 2:
        key_pad = attention_mask  # [b, s]
    elif attention_mask.dim() == 4 and shape[1] == 1 and shape[2] == 1:
        key_pad = attention_mask[:, 0, 0, :]  # [b, s]
    else:
        raise ValueError(f"soft-mask attention takes a key-padding mask [b, 1, 1, s] (or [b, s]); "
                         f"got shape {shape}: a full [b, 1, sq, sk] mask is not supported, the "
                         "causal/soft structure comes from the schedule")
    if key_pad.shape[-1] != seq_len or key_pad.shape[0] not in (1, batch):
        raise ValueError(f"key-padding mask of shape {shape} does not match batch {batch} and "
                         f"sequence {seq_len}")
    key_pad = key_pad.expand(batch, seq_len).to(device)
    lengths = (~key_pad).sum(dim=-1, dtype=torch.int32)  # [b]
    expected = torch.arange(seq_len, device=device).view(1, -1) >= lengths.view(-1, 1)
    if not torch.equal(key_pad, expected):
        raise ValueError("soft-mask attention needs right padding: every padded key must come "
                         "after every real one in each sequence")
    return lengths


class _PerMaskCache:
    """One entry: the value computed for the last (tensor, other key parts). The layers of a forward
    all receive the same attention-mask tensor, so its lengths and row weights are computed once per
    forward instead of once per layer. The entry holds the tensor itself, so identity cannot be
    confused with a later tensor at a reused address."""

    def __init__(self):
        self._tensor, self._key, self._value = None, None, None

    def get(self, tensor, key, compute):
        if self._value is None or tensor is not self._tensor or key != self._key:
            self._tensor, self._key, self._value = tensor, key, compute()
        return self._value


_row_weights_cache = _PerMaskCache()
_text_buckets_cache = _PerMaskCache()


class SoftMaskCoreAttention(MegatronModule):
    """Core attention with the soft mask of docs/DESIGN.md section 4 (a = 0: causal, a = 1: full)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        soft_mask: Optional[SoftMaskConfig] = None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SoftMaskCoreAttention has no attention dropout: set "
                             f"attention_dropout=0 (got {dropout})")
        if config.context_parallel_size != 1:
            raise ValueError("SoftMaskCoreAttention does not support context parallelism "
                             f"(context_parallel_size={config.context_parallel_size})")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SoftMaskCoreAttention supports softmax_type='vanilla' only, got "
                             f"{config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SoftMaskCoreAttention does not support sliding-window attention")
        if attention_type != "self":
            raise ValueError(f"SoftMaskCoreAttention is self-attention only, got {attention_type!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.head_dim = config.kv_channels
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_groups_per_partition = divide(config.num_query_groups, tp_size)
        # query-key layer scaling cancels inside DotProductAttention's softmax: the net scale is this
        self.softmax_scale = (1.0 / math.sqrt(self.head_dim) if softmax_scale is None
                              else softmax_scale)
        self.schedule = SoftMaskSchedule(soft_mask if soft_mask is not None else SoftMaskConfig())

    @property
    def a(self) -> float:
        return self.schedule.a

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SoftMaskCoreAttention does not take an attention bias")
        if packed_seq_params is not None:
            return self._packed_forward(query, key, value, attention_mask, packed_seq_params)
        sq, batch, heads, head_dim = query.shape  # [sq, b, np, hn]
        if key.shape[0] != sq:
            raise ValueError(f"SoftMaskCoreAttention is self-attention over one sequence: "
                             f"sq={sq} but sk={key.shape[0]} (no KV-cache inference)")
        config = self.schedule.config

        def lengths_and_weights():
            lengths = lengths_from_key_padding_mask(attention_mask, batch, sq, query.device)
            return lengths, self.schedule.row_weights(lengths, sq)  # [b], [b, s] float32

        lengths, m = _row_weights_cache.get(
            attention_mask, (batch, sq, query.device, self.schedule.a, config.position_scale), lengths_and_weights)
        out = soft_mask_attention(
            query.permute(1, 2, 0, 3),  # [b, np, s, hn]
            key.permute(1, 2, 0, 3),  # [b, ng, s, hn]
            value.permute(1, 2, 0, 3),
            m, lengths, softmax_scale=self.softmax_scale, backend=config.backend,
            deterministic=config.deterministic)
        return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * head_dim)  # [sq, b, np * hn]

    def _packed_forward(self, query, key, value, attention_mask, params) -> torch.Tensor:
        """Packed rows: sbhd q [t, 1, np, hn] -> [t, 1, np * hn], or thd q [t, np, hn] -> [t, np * hn]
        (k, v alike with ng heads)."""
        width = getattr(params, "row_width", None)
        if params.qkv_format not in ("sbhd", "thd") or width is None:
            raise NotImplementedError("SoftMaskCoreAttention takes packed sequences as PackedRows "
                                      "(sbhd or thd with a row width, models/packing.py)")
        if params.qkv_format == "sbhd":
            if query.dim() != 4 or query.shape[1] != 1:
                raise ValueError(f"packed sbhd rows are one flattened sequence [t, 1, heads, hn]; got "
                                 f"{tuple(query.shape)}")
            return self._packed_rows(query[:, 0], key[:, 0], value[:, 0], attention_mask, params,
                                     width).unsqueeze(1)  # [t, 1, np * hn]
        return self._packed_rows(query, key, value, attention_mask, params, width)

    def _packed_rows(self, query, key, value, attention_mask, params, width: int) -> torch.Tensor:
        """q [t, np, hn], k, v [t, ng, hn] of `rows` packed rows of `width` -> [t, np * hn]."""
        if attention_mask is not None:
            raise ValueError("packed rows carry their texts in cu_seqlens: pass no attention mask")
        tokens, heads, head_dim = query.shape
        if tokens % width:
            raise ValueError(f"{tokens} packed tokens are not whole rows of {width}")
        rows = tokens // width
        config = self.schedule.config
        if resolve_backend(config.backend, query.device, head_dim) == "sdpa":  # no kernel to skip cross-text blocks
            plan = _text_buckets_cache.get(params, (rows, width, query.device), lambda: plan_text_buckets(
                params.cu_seqlens_q, params.cu_seqlens_q_padded, rows, width))
            if plan is not None:
                return self._text_buckets(query, key, value, plan)

        def windows_and_weights():
            windows = key_windows_from_cu_seqlens(params.cu_seqlens_q, params.cu_seqlens_q_padded, rows, width)
            return windows, self.schedule.row_weights(None, width, windows)  # ([r, w] x2), [r, w]

        windows, m = _row_weights_cache.get(
            params, (rows, width, query.device, self.schedule.a, config.position_scale), windows_and_weights)

        def as_rows(x):
            return x.view(rows, width, x.shape[1], head_dim).permute(0, 2, 1, 3)  # [r, heads, w, hn]

        out = soft_mask_attention(as_rows(query), as_rows(key), as_rows(value), m, windows[1].max(dim=1).values,
                                  softmax_scale=self.softmax_scale, backend=config.backend,
                                  deterministic=config.deterministic, windows=windows)
        return out.permute(0, 2, 1, 3).reshape(tokens, heads * head_dim)  # [t, np * hn]

    def _text_buckets(self, query, key, value, plan: TextBuckets) -> torch.Tensor:
        """q [t, np, hn], k, v [t, ng, hn] of packed rows, attended text by text in right-padded
        buckets of like length (``text_buckets.py``) -> [t, np * hn]."""
        tokens, heads, head_dim = query.shape
        config = self.schedule.config
        state = (self.schedule.a, config.position_scale)
        if state not in plan.weights:
            plan.weights[state] = [self.schedule.row_weights(bucket.lengths, bucket.token.shape[1])
                                   for bucket in plan.buckets]  # [n_b, L_b] each
        pieces = []
        for bucket, m in zip(plan.buckets, plan.weights[state]):
            q, k, v = (x[bucket.token].permute(0, 2, 1, 3) for x in (query, key, value))  # [n_b, heads, L_b, hn]
            out = soft_mask_attention(q, k, v, m, bucket.lengths, softmax_scale=self.softmax_scale,
                                      backend=config.backend, deterministic=config.deterministic)  # [n_b, np, L_b, hn]
            pieces.append(out.permute(0, 2, 1, 3)[bucket.keep])  # [real tokens, np, hn]
        real = torch.cat(pieces).reshape(-1, heads * head_dim)
        return real.new_zeros(tokens, heads * head_dim).index_copy(0, plan.positions, real)  # [t, np * hn]


def soft_mask_core_attention_spec(soft_mask: Optional[SoftMaskConfig] = None) -> ModuleSpec:
    """The ModuleSpec to put in the layer spec's `core_attention` slot."""
    return ModuleSpec(module=SoftMaskCoreAttention, params={"soft_mask": soft_mask or SoftMaskConfig()})


def _soft_mask_modules(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]):
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, SoftMaskCoreAttention)]


def set_soft_mask_step(model, step: int) -> int:
    """Sets training step t in every SoftMaskCoreAttention of `model` (a module or a list of model
    chunks); returns how many were updated."""
    modules = _soft_mask_modules(model)
    for module in modules:
        module.schedule.set_step(step)
    return len(modules)


def get_soft_mask_state(model) -> Optional[Dict[str, Any]]:
    """The schedule progress to checkpoint ({"step", "config"}), or None without soft-mask layers."""
    modules = _soft_mask_modules(model)
    if not modules:
        return None
    states = [module.schedule.state_dict() for module in modules]
    if any(state != states[0] for state in states[1:]):
        raise RuntimeError("soft-mask layers of one model disagree on their schedule state")
    return states[0]


def load_soft_mask_state(model, state: Optional[Dict[str, Any]]) -> int:
    """Restores `get_soft_mask_state` output into every soft-mask layer; returns how many."""
    modules = _soft_mask_modules(model)
    if state is None:
        return 0
    for module in modules:
        module.schedule.load_state_dict(state)
    return len(modules)


def soft_mask_a(model) -> Optional[float]:
    """a(t) the soft-mask layers of `model` use now, or None without soft-mask layers."""
    modules = _soft_mask_modules(model)
    return modules[0].a if modules else None
