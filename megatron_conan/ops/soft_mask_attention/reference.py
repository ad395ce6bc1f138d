"""The soft-mask attention specification in plain PyTorch (docs/DESIGN.md section 4).

Canonical layout shared by every backend:
    q        [b, hq, s, d]     query heads; head h reads KV group h // (hq // hkv) (megatron GQA)
    k, v     [b, hkv, s, d]
    m        float32 [b, s]    per-row weight of the future keys, in [0, 1]
    lengths  int32 [b]         true lengths; positions >= length are right padding
    out      [b, hq, s, d]     zero on padded rows; lse float32 [b, hq, s] (natural log)

    logit[i, j] = scale * q_i . k_j + log M[i, j]
    M[i, j] = 1 (j <= i),  m_i (j > i),  0 (j >= length: padding keys are always masked)

M = 0 is -inf, so m_i = 0 gives causal attention exactly and m_i = 1 bidirectional attention.
Padded query rows output zero and receive zero gradient.

Packed rows (several texts per row, megatron's thd layout cut into rows): every position i carries
a key window [lo_i, hi_i), the text it belongs to (``key_windows_from_cu_seqlens``), and

    M[i, j] = 1 (lo_i <= j <= i),  m_i (i < j < hi_i),  0 otherwise

so no token attends across texts and the soft mask applies inside each text as it does padded. A
padded row is the special case lo_i = 0, hi_i = length (``key_windows_from_lengths``); positions in
no text have lo_i = hi_i and behave as padded rows. Every backend reads the windows, not the
lengths, when they are given.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Tuple

import torch


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor,
                 lengths: torch.Tensor) -> None:
    """Shape checks shared by all backends; raises ValueError naming the argument."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [b, heads, s, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"k and v must be [b={b}, hkv, s={s}, d={d}]; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV groups ({k.shape[1]})")
    if m.shape != (b, s):
        raise ValueError(f"m must be [b={b}, s={s}]; got {tuple(m.shape)}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [b={b}]; got {tuple(lengths.shape)}")


Windows = Tuple[torch.Tensor, torch.Tensor]
"""(lo, hi), int32 [b, s] each: the keys position i may attend to, [lo_i, hi_i) (empty: no text)."""


def key_windows_from_lengths(lengths: torch.Tensor, seq_len: int) -> Windows:
    """Windows of right-padded rows: [0, length) for real positions, empty for padding."""
    pos = torch.arange(seq_len, device=lengths.device).view(1, -1)
    length = lengths.to(torch.int32).view(-1, 1)
    hi = torch.where(pos < length, length, torch.zeros((), dtype=torch.int32, device=lengths.device))
    return torch.zeros_like(hi), hi.to(torch.int32)


def key_windows_from_cu_seqlens(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor, rows: int,
                                width: int) -> Windows:
    """Windows of `rows` packed rows of `width` positions, in megatron's thd convention: text t holds
    flattened positions [cu_seqlens_padded[t], cu_seqlens_padded[t] + len_t), len_t = cu_seqlens[t+1]
    - cu_seqlens[t]; the rest of its padded slot is padding. Windows are relative to the row."""
    cu = cu_seqlens.to(torch.long)
    starts = cu_seqlens_padded.to(torch.long)[:-1]  # [n] flattened start of each text
    text_len = cu[1:] - cu[:-1]  # [n]
    if len(starts) and bool(((starts % width) + text_len > width).any()):
        raise ValueError(f"a packed text crosses a row boundary (row width {width})")
    if len(starts) and int((starts + text_len).max()) > rows * width:
        raise ValueError(f"packed texts end past {rows} rows of {width} positions")
    device = cu_seqlens.device
    text_ids = torch.repeat_interleave(torch.arange(len(starts), device=device), text_len)  # [t]
    offset_in_text = torch.arange(len(text_ids), device=device) - cu[:-1][text_ids]  # [t]
    flat = starts[text_ids] + offset_in_text  # [t] position of each token in the rows
    row_start = starts % width  # [n]
    lo = torch.zeros(rows * width, dtype=torch.int32, device=device)
    hi = torch.zeros(rows * width, dtype=torch.int32, device=device)
    lo[flat] = row_start[text_ids].to(torch.int32)
    hi[flat] = (row_start + text_len)[text_ids].to(torch.int32)
    return lo.view(rows, width), hi.view(rows, width)


def check_windows(windows: Windows, batch: int, seq_len: int) -> None:
    lo, hi = windows
    if lo.shape != (batch, seq_len) or hi.shape != (batch, seq_len):
        raise ValueError(f"key windows must be [b={batch}, s={seq_len}]; got {tuple(lo.shape)}, "
                         f"{tuple(hi.shape)}")


def default_softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def soft_mask_log_weights(m: torch.Tensor, lengths: torch.Tensor, seq_len: int,
                          dtype: torch.dtype = torch.float32, windows: Optional[Windows] = None) -> torch.Tensor:
    """log M as an additive bias, [b, 1, s, s]; rows of padded queries get 0 (no -inf rows)."""
    device = m.device
    lo, hi = (key_windows_from_lengths(lengths, seq_len) if windows is None else windows)
    lo = lo.to(device=device, dtype=torch.long).unsqueeze(-1)  # [b, s, 1]
    hi = hi.to(device=device, dtype=torch.long).unsqueeze(-1)
    i = torch.arange(seq_len, device=device).view(1, seq_len, 1)  # query position
    j = torch.arange(seq_len, device=device).view(1, 1, seq_len)  # key position
    log_m = torch.log(m.to(dtype)).unsqueeze(-1)  # [b, s, 1], -inf where m = 0
    zero = torch.zeros((), dtype=dtype, device=device)
    minus_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
    bias = torch.where(j <= i, zero, log_m)  # [b, s, s]
    bias = torch.where((j >= lo) & (j < hi), bias, minus_inf)
    bias = torch.where(hi > lo, bias, zero)  # padded rows: finite, zeroed after
    return bias.unsqueeze(1)  # [b, 1, s, s]


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.repeat_interleave(hq // x.shape[1], dim=1) if x.shape[1] != hq else x


def _valid_rows(lengths: torch.Tensor, seq_len: int, device, windows: Optional[Windows] = None) -> torch.Tensor:
    if windows is not None:
        lo, hi = windows
        return (hi > lo).to(device).view(hi.shape[0], 1, seq_len, 1)  # [b, 1, s, 1]
    pos = torch.arange(seq_len, device=device).view(1, 1, seq_len, 1)
    return pos < lengths.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)  # [b, 1, s, 1]


def soft_mask_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  m: torch.Tensor, lengths: torch.Tensor,
                                  softmax_scale: Optional[float] = None,
                                  return_lse: bool = False, windows: Optional[Windows] = None):
    """Soft-mask attention computed the obvious way, in the dtype of q (softmax in float32 for
    16-bit inputs, as a PyTorch user would write it). Differentiable; any dtype. `windows`: packed
    rows (see the module docstring); `lengths` is then unused."""
    check_inputs(q, k, v, m, lengths)
    if windows is not None:
        check_windows(windows, q.shape[0], q.shape[2])
    b, hq, s, d = q.shape
    scale = default_softmax_scale(d) if softmax_scale is None else softmax_scale
    softmax_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    k = _expand_kv(k, hq)  # [b, hq, s, d]
    v = _expand_kv(v, hq)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(softmax_dtype) * scale  # [b, hq, s, s]
    scores = scores + soft_mask_log_weights(m, lengths, s, softmax_dtype, windows)
    lse = torch.logsumexp(scores, dim=-1)  # [b, hq, s]
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)  # [b, hq, s, d]
    valid = _valid_rows(lengths, s, q.device, windows)
    out = torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
    if return_lse:
        return out, lse.float()
    return out


_BIAS_ENTRIES = 16
_recent_biases: list = []  # (weak reference to m, lengths, windows, (seq_len, dtype), bias), newest last


def _bias_for(m: torch.Tensor, lengths: torch.Tensor, seq_len: int, dtype: torch.dtype,
              windows: Optional[Windows]) -> torch.Tensor:
    """soft_mask_log_weights, reused while the layers of a forward pass the same m, lengths and
    windows. Several entries: packed rows attended text by text pass one (m, lengths) per bucket of
    texts (``text_buckets.py``) in every layer. An entry lives only as long as its m (a weak
    reference: the caller's per-forward caches own m), so a [b, 1, s, s] bias is never kept past the
    forward that made it, and identity cannot be confused with a later tensor at the same address."""
    _recent_biases[:] = [entry for entry in _recent_biases if entry[0]() is not None]
    for held_m, held_lengths, held_windows, key, bias in _recent_biases:
        # the windows tuple is rebuilt per call, its tensors are not; with windows, lengths is unused
        # (the packed rows path derives it anew in every layer)
        same_windows = (held_windows is None and windows is None) or (
            held_windows is not None and windows is not None
            and all(held is given for held, given in zip(held_windows, windows)))
        if (held_m() is m and same_windows and key == (seq_len, dtype)
                and (windows is not None or held_lengths is lengths)):
            return bias
    bias = soft_mask_log_weights(m, lengths, seq_len, dtype, windows)
    _recent_biases.append((weakref.ref(m), lengths, windows, (seq_len, dtype), bias))
    del _recent_biases[:-_BIAS_ENTRIES]
    return bias


def soft_mask_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor,
                             lengths: torch.Tensor, softmax_scale: Optional[float] = None,
                             windows: Optional[Windows] = None) -> torch.Tensor:
    """The same maths through torch's fused ``scaled_dot_product_attention`` with log M as a float
    mask: no [b, h, s, s] probabilities kept for backward on the CPU flash path, and torch's own
    backward. The CPU backend of ``auto``; on GPUs a fallback (the mask is materialised, so the fused
    kernels are faster there)."""
    check_inputs(q, k, v, m, lengths)
    b, hq, s, d = q.shape
    scale = default_softmax_scale(d) if softmax_scale is None else softmax_scale
    if windows is not None:
        check_windows(windows, b, s)
    bias = _bias_for(m, lengths, s, q.dtype, windows)  # [b, 1, s, s]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                                           enable_gqa=k.shape[1] != hq)  # [b, hq, s, d]
    valid = _valid_rows(lengths, s, q.device, windows)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _attention_with_lse(q, k, v, scale, mask):
    """Plain masked attention; mask [b or 1, 1, s, s] bool, True = keep."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [b, h, s, 1]
    return torch.matmul(torch.exp(scores - lse), v), lse


def soft_mask_attention_identity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 m: torch.Tensor, lengths: torch.Tensor,
                                 softmax_scale: Optional[float] = None) -> torch.Tensor:
    """The two-call identity of docs/DESIGN.md section 4, an independent check of the reference:

        O_i = ((1 - m_i) e^{lse_c} O_c + m_i e^{lse_f} O_f) / ((1 - m_i) e^{lse_c} + m_i e^{lse_f})

    with (O_c, lse_c) from causal and (O_f, lse_f) from full attention (padding keys masked in both).
    """
    check_inputs(q, k, v, m, lengths)
    b, hq, s, d = q.shape
    scale = default_softmax_scale(d) if softmax_scale is None else softmax_scale
    k = _expand_kv(k, hq)
    v = _expand_kv(v, hq)
    pos = torch.arange(s, device=q.device)
    key_valid = (pos.view(1, 1, 1, s) < lengths.to(q.device).long().view(-1, 1, 1, 1))  # [b,1,1,s]
    row_valid = _valid_rows(lengths, s, q.device)  # [b, 1, s, 1]
    # padded rows see one key so that nothing is NaN; their output is zeroed below
    key_valid = key_valid | (~row_valid & (pos.view(1, 1, 1, s) == 0))
    causal = (pos.view(1, 1, s, 1) >= pos.view(1, 1, 1, s)) & key_valid
    out_c, lse_c = _attention_with_lse(q, k, v, scale, causal)
    out_f, lse_f = _attention_with_lse(q, k, v, scale, key_valid)
    mi = m.to(q.dtype).view(b, 1, s, 1)
    top = torch.maximum(lse_c, lse_f)  # subtracted for stability; cancels in the ratio
    w_c = (1 - mi) * torch.exp(lse_c - top)
    w_f = mi * torch.exp(lse_f - top)
    out = (w_c * out_c + w_f * out_f) / (w_c + w_f)
    return torch.where(row_valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
