"""Fused soft-mask attention in Triton: flash-attention style forward and backward.

Specification: `reference.soft_mask_attention_reference` (read it first), restated:

    logit[i, j] = scale * q_i . k_j + log M[i, j],  M[i, j] = 1 (j <= i), m_i (i < j < L), 0 (j >= L)
    out_i = softmax_j(logit[i, :]) @ V,  zero for padded rows i >= L

Layout: q [b, hq, s, d], k/v [b, hkv, s, d] (stride 1 on d), m float32 [b, s], and the key windows
lo, hi int32 [b, s] (reference.py): row i attends to keys [lo_i, hi_i), its own text. A right-padded
row has [0, L) on its real positions; a packed row (several texts, from cu_seqlens) one window per
text; positions in no text have an empty window and behave as padding.

How the kernel walks the keys of one query block [start_m, start_m + BLOCK_M): only key blocks
between the smallest lo and the largest hi of its real rows are visited, so blocks that hold only
other texts' keys (or padding) are skipped entirely:

    BELOW  key blocks entirely at/below the diagonal: no bias
    DIAG   key blocks crossing the diagonal: elementwise, log m_i where j > i
    ABOVE  key blocks entirely above it: log m_i added per row; visited only when some valid row of
           the query block has m_i > 0, so with a = 0 the kernel visits exactly the causal blocks
Every block masks keys outside each row's window (one compare per element: a block below the
diagonal may still straddle a text boundary in a packed row).

Online softmax in base 2 with fp32 accumulators; inputs fp16 / bf16 / fp32 (fp32 dots in IEEE
precision, not TF32). The head dim is padded to a power of two inside the kernel (112 -> 128).
The forward saves the LSE (natural log, +inf on padded rows so that their backward is exactly zero).
Backward: delta = rowsum(dO * O); one program per (key block, KV head) accumulates dK and dV over the
query heads of its group (deterministic), and dQ either by fp32 atomics from the same program
(fast, order-nondeterministic) or, with `deterministic=True`, by a second kernel per query block.

An optional int32 counter [1] counts the key blocks the forward visits (block skipping is tested
with it on CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .reference import Windows, check_inputs, check_windows, default_softmax_scale, key_windows_from_lengths
from .triton_interpreter import squeeze_scalar_index

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    squeeze_scalar_index()  # Triton 3.6's interpreter with NumPy 2.5 (see triton_interpreter.py)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MODE_BELOW = 0
MODE_DIAG = 1
MODE_ABOVE = 2


@triton.jit
def _log2_weights(m_row):
    """log2 m per row, -inf where m = 0 (without evaluating log2(0))."""
    return tl.where(m_row > 0.0, tl.log2(tl.maximum(m_row, 1e-30)), float("-inf"))


@triton.jit
def _masked_scores(s, offs_m, offs_n, log2m, lo, hi, MODE: tl.constexpr):
    """Adds log2 M to base-2 logits s [BLOCK_M, BLOCK_N] for the given block relation; keys outside
    each row's window [lo, hi) get -inf."""
    if MODE == 1:
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, s + log2m[:, None])
    if MODE == 2:
        s = s + log2m[:, None]
    return tl.where((offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None]), s, float("-inf"))


@triton.jit
def _query_program(H, GROUP, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Indices of a program that owns one query block of one query head."""
    pid_bh = tl.program_id(1)
    bz = pid_bh // H
    h = pid_bh % H
    start_m = tl.program_id(0) * BLOCK_M
    return (pid_bh, bz, h, h // GROUP, start_m, start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D))


@triton.jit
def _windows(KLO, KHI, offs, S):
    """Key windows [lo, hi) of positions `offs` (empty past the row) and which of them are real."""
    lo = tl.load(KLO + offs, mask=offs < S, other=0)
    hi = tl.load(KHI + offs, mask=offs < S, other=0)
    return lo, hi, hi > lo


@triton.jit
def _fwd_inner(acc, l_i, row_max, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, log2m,
               row_lo, row_hi, S, D, lo, hi, scale_log2, counter_ptr,
               MODE: tl.constexpr, BLOCK_N: tl.constexpr, COUNT_BLOCKS: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    for block_n in range(lo, hi):
        offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        s = _masked_scores(s, offs_m, offs_n, log2m, row_lo, row_hi, MODE)
        new_max = tl.maximum(row_max, tl.max(s, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - safe_max[:, None])
        alpha = tl.exp2(row_max - safe_max)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        row_max = new_max
        if COUNT_BLOCKS:
            tl.atomic_add(counter_ptr, 1)
    return acc, l_i, row_max


@triton.jit
def _row_weights_and_ranges(m_base, offs_m, start_m, lo, hi, row_valid, S, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """log2 m of the query block's rows and its key-block ranges [first, a) BELOW, [a, b) DIAG,
    [b, c) ABOVE, all within the rows' windows (empty without a real row); ABOVE is empty (skipped)
    unless a valid row has m_i > 0."""
    m_row = tl.load(m_base + offs_m, mask=row_valid, other=0.0)
    row_open = tl.max(m_row, 0) > 0.0
    in_seq = tl.max(row_valid.to(tl.int32), 0) > 0
    first_key = tl.min(tl.where(row_valid, lo, S), 0)
    last_key = tl.max(tl.where(row_valid, hi, 0), 0)  # exclusive
    n_first = tl.where(in_seq, first_key // BLOCK_N, 0)
    n_below = tl.where(in_seq, tl.maximum(start_m // BLOCK_N, n_first), 0)
    n_causal = tl.where(in_seq, tl.cdiv(tl.minimum(start_m + BLOCK_M, last_key), BLOCK_N), 0)
    n_total = tl.where(in_seq & row_open, tl.cdiv(last_key, BLOCK_N), n_causal)
    return _log2_weights(m_row), n_first, n_below, n_causal, n_total


@triton.jit
def _soft_mask_fwd_kernel(
        Q, K, V, M, KLO, KHI, O, LSE, COUNTER,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, stride_mb, stride_wb,
        H, GROUP, S, D, scale_log2,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        COUNT_BLOCKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_bh, bz, h, kvh, start_m, offs_m, offs_d = _query_program(H, GROUP, BLOCK_M, BLOCK_D)
    row_lo, row_hi, row_valid = _windows(KLO + bz * stride_wb, KHI + bz * stride_wb, offs_m, S)

    q_ptrs = Q + bz * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    log2m, n_first, n_below, n_causal, n_total = _row_weights_and_ranges(
        M + bz * stride_mb, offs_m, start_m, row_lo, row_hi, row_valid, S, BLOCK_M, BLOCK_N)

    k_base = K + bz * stride_kb + kvh * stride_kh
    v_base = V + bz * stride_vb + kvh * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, row_max = _fwd_inner(acc, l_i, row_max, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, offs_d, log2m, row_lo, row_hi, S, D, n_first, n_below,
                                   scale_log2, COUNTER, 0, BLOCK_N, COUNT_BLOCKS, DOT_PRECISION)
    acc, l_i, row_max = _fwd_inner(acc, l_i, row_max, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, offs_d, log2m, row_lo, row_hi, S, D, n_below, n_causal,
                                   scale_log2, COUNTER, 1, BLOCK_N, COUNT_BLOCKS, DOT_PRECISION)
    acc, l_i, row_max = _fwd_inner(acc, l_i, row_max, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, offs_d, log2m, row_lo, row_hi, S, D, n_causal, n_total,
                                   scale_log2, COUNTER, 2, BLOCK_N, COUNT_BLOCKS, DOT_PRECISION)

    safe_l = tl.where(row_valid & (l_i > 0.0), l_i, 1.0)
    out = tl.where(row_valid[:, None], acc / safe_l[:, None], 0.0)
    lse = tl.where(row_valid, (row_max + tl.log2(safe_l)) * 0.6931471805599453, float("inf"))
    o_ptrs = O + bz * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < S) & (offs_d[None, :] < D))
    tl.store(LSE + pid_bh * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, m_base, klo, khi,
                    stride_qs, stride_dos, stride_dqs, offs_n, offs_d, S, D, lo, hi,
                    scale_log2, scale,
                    MODE: tl.constexpr, BLOCK_M: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    for block_m in range(lo, hi):
        offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_lo, row_hi, row_valid = _windows(klo, khi, offs_m, S)
        m_row = tl.load(m_base + offs_m, mask=row_valid, other=0.0)
        if (MODE != 2) | (tl.max(m_row, 0) > 0.0):
            log2m = _log2_weights(m_row)
            row_mask = row_valid[:, None] & (offs_d[None, :] < D)
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_mask,
                        other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_mask,
                         other=0.0)
            lse2 = tl.load(lse_base + offs_m, mask=row_valid, other=float("inf")) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m, mask=row_valid, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            s = _masked_scores(s, offs_m, offs_n, log2m, row_lo, row_hi, MODE)
            p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N]; 0 on padded rows (lse = +inf)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * scale
                tl.atomic_add(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], dq,
                              mask=row_mask)
    return dk, dv


@triton.jit
def _soft_mask_bwd_dkdv_kernel(
        Q, K, V, DO, M, KLO, KHI, LSE, DELTA, DK, DV, DQ,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
        stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
        stride_dqb, stride_dqh, stride_dqs, stride_mb, stride_wb,
        H, HKV, GROUP, S, D, scale_log2, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    bz = pid_bkv // HKV
    kvh = pid_bkv % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    klo = KLO + bz * stride_wb
    khi = KHI + bz * stride_wb
    key_lo, key_hi, key_valid = _windows(klo, khi, offs_n, S)
    kv_mask = key_valid[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + bz * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + bz * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks relative to this key block: ABOVE (all rows before it), DIAG, BELOW (all after),
    # only those holding rows of the keys' texts (a key's text is its own window).
    in_seq = tl.max(key_valid.to(tl.int32), 0) > 0
    n_q_first = tl.where(in_seq, tl.min(tl.where(key_valid, key_lo, S), 0) // BLOCK_M, 0)
    n_q = tl.where(in_seq, tl.cdiv(tl.max(tl.where(key_valid, key_hi, 0), 0), BLOCK_M), 0)
    n_above = tl.maximum(tl.minimum(start_n // BLOCK_M, n_q), n_q_first)
    n_diag_end = tl.maximum(tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M), n_q), n_above)
    m_base = M + bz * stride_mb
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        q_base = Q + bz * stride_qb + h * stride_qh
        do_base = DO + bz * stride_dob + h * stride_doh
        dq_base = DQ + bz * stride_dqb + h * stride_dqh
        lse_base = LSE + (bz * H + h) * S
        delta_base = DELTA + (bz * H + h) * S
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                                 m_base, klo, khi, stride_qs, stride_dos, stride_dqs, offs_n, offs_d,
                                 S, D, n_q_first, n_above, scale_log2, scale, 2, BLOCK_M, ATOMIC_DQ,
                                 DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                                 m_base, klo, khi, stride_qs, stride_dos, stride_dqs, offs_n, offs_d,
                                 S, D, n_above, n_diag_end, scale_log2, scale, 1, BLOCK_M, ATOMIC_DQ,
                                 DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                                 m_base, klo, khi, stride_qs, stride_dos, stride_dqs, offs_n, offs_d,
                                 S, D, n_diag_end, n_q, scale_log2, scale, 0, BLOCK_M, ATOMIC_DQ,
                                 DOT_PRECISION)
    out_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    tl.store(DK + bz * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + bz * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                  log2m, row_lo, row_hi, S, D, lo, hi, scale_log2,
                  MODE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for block_n in range(lo, hi):
        offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = _masked_scores(s, offs_m, offs_n, log2m, row_lo, row_hi, MODE)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _soft_mask_bwd_dq_kernel(
        Q, K, V, DO, M, KLO, KHI, LSE, DELTA, DQ,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
        stride_dqb, stride_dqh, stride_dqs, stride_mb, stride_wb,
        H, GROUP, S, D, scale_log2, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    pid_bh, bz, h, kvh, start_m, offs_m, offs_d = _query_program(H, GROUP, BLOCK_M, BLOCK_D)
    row_lo, row_hi, row_valid = _windows(KLO + bz * stride_wb, KHI + bz * stride_wb, offs_m, S)
    row_mask = row_valid[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + bz * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_mask, other=0.0)
    do = tl.load(DO + bz * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos
                 + offs_d[None, :], mask=row_mask, other=0.0)
    lse2 = tl.load(LSE + pid_bh * S + offs_m, mask=row_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * S + offs_m, mask=row_valid, other=0.0)
    log2m, n_first, n_below, n_causal, n_total = _row_weights_and_ranges(
        M + bz * stride_mb, offs_m, start_m, row_lo, row_hi, row_valid, S, BLOCK_M, BLOCK_N)
    k_base = K + bz * stride_kb + kvh * stride_kh
    v_base = V + bz * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                       log2m, row_lo, row_hi, S, D, n_first, n_below, scale_log2, 0, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                       log2m, row_lo, row_hi, S, D, n_below, n_causal, scale_log2, 1, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                       log2m, row_lo, row_hi, S, D, n_causal, n_total, scale_log2, 2, BLOCK_N, DOT_PRECISION)
    tl.store(DQ + bz * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < S) & (offs_d[None, :] < D))


# ------------------------------------------------------------------------------------------------
# Launchers

def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _contiguous_windows(windows: Optional[Windows], lengths: torch.Tensor, batch: int, seq_len: int) -> Windows:
    """The key windows the kernels read: given (packed rows) or from the lengths (padded rows)."""
    if windows is None:
        windows = key_windows_from_lengths(lengths.to(torch.int32), seq_len)
    check_windows(windows, batch, seq_len)
    lo, hi = (w.to(torch.int32).contiguous() for w in windows)
    if lo.stride(0) != hi.stride(0):
        raise ValueError("key windows lo and hi must have the same layout")
    return lo, hi


def soft_mask_attention_triton_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor, lengths: torch.Tensor,
        softmax_scale: Optional[float] = None, block_counter: Optional[torch.Tensor] = None,
        block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
        windows: Optional[Windows] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: returns (out [b, hq, s, d], lse float32 [b, hq, s]). `windows`: packed
    rows' key windows (reference.py); without them, right-padded rows of `lengths`."""
    check_inputs(q, k, v, m, lengths)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    m = m.to(torch.float32).contiguous()
    b, hq, s, d = q.shape
    lo, hi = _contiguous_windows(windows, lengths, b, s)
    hkv = k.shape[1]
    scale = default_softmax_scale(d) if softmax_scale is None else softmax_scale
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    counter = block_counter if block_counter is not None else lse  # unused pointer if not counting
    grid = (triton.cdiv(s, block_m), b * hq)
    _soft_mask_fwd_kernel[grid](
        q, k, v, m, lo, hi, out, lse, counter,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        m.stride(0), lo.stride(0), hq, hq // hkv, s, d, scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(d),
        COUNT_BLOCKS=block_counter is not None, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    return out, lse


def soft_mask_attention_triton_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, m: torch.Tensor, lengths: torch.Tensor,
        softmax_scale: Optional[float] = None, deterministic: bool = False,
        block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
        windows: Optional[Windows] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: returns (dq, dk, dv) in the dtypes of q, k, v."""
    q, k, v, grad_out = (_last_dim_contiguous(x) for x in (q, k, v, grad_out))
    m = m.to(torch.float32).contiguous()
    lse = lse.contiguous()
    b, hq, s, d = q.shape
    lo, hi = _contiguous_windows(windows, lengths, b, s)
    hkv = k.shape[1]
    scale = default_softmax_scale(d) if softmax_scale is None else softmax_scale
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # [b, hq, s]
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dq_accum = (torch.empty_like(q) if deterministic
                else torch.zeros(q.shape, dtype=torch.float32, device=q.device))
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(d),
                  DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps,
                  num_stages=num_stages)
    _soft_mask_bwd_dkdv_kernel[(triton.cdiv(s, block_n), b * hkv)](
        q, k, v, grad_out, m, lo, hi, lse, delta, dk, dv, dq_accum,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1),
        grad_out.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        dq_accum.stride(0), dq_accum.stride(1), dq_accum.stride(2), m.stride(0), lo.stride(0),
        hq, hkv, hq // hkv, s, d, scale * LOG2E, scale, ATOMIC_DQ=not deterministic, **common)
    if not deterministic:
        return dq_accum.to(q.dtype), dk, dv
    dq = dq_accum
    _soft_mask_bwd_dq_kernel[(triton.cdiv(s, block_m), b * hq)](
        q, k, v, grad_out, m, lo, hi, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1),
        grad_out.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), m.stride(0), lo.stride(0),
        hq, hq // hkv, s, d, scale * LOG2E, scale, **common)
    return dq, dk, dv


def causal_block_count(lengths, seq_len: int, heads: int, block_m: int, block_n: int) -> int:
    """Key blocks the forward visits when every m_i = 0 (the causal cost), for tests/benchmarks."""
    total = 0
    for L in [int(x) for x in lengths]:
        for start_m in range(0, min(seq_len, L), block_m):
            total += math.ceil(min(start_m + block_m, L) / block_n)
    return total * heads


def windowed_block_count(m: torch.Tensor, windows: Windows, heads: int, block_m: int, block_n: int) -> int:
    """Key blocks the forward visits on rows with key windows (same rule as the kernel)."""
    lo, hi = windows
    total = 0
    for bz in range(lo.shape[0]):
        for start_m in range(0, lo.shape[1], block_m):
            rows = slice(start_m, start_m + block_m)
            valid = hi[bz, rows] > lo[bz, rows]
            if not bool(valid.any()):
                continue
            first = int(lo[bz, rows][valid].min()) // block_n
            last = int(hi[bz, rows][valid].max())
            end = math.ceil(last / block_n) if bool((m[bz, rows][valid] > 0).any()) \
                else math.ceil(min(start_m + block_m, last) / block_n)
            total += end - first
    return total * heads


def visited_block_count(m: torch.Tensor, lengths, seq_len: int, heads: int, block_m: int,
                        block_n: int) -> int:
    """Key blocks the skip rule visits for given row weights (same rule as the kernel)."""
    total = 0
    for bz, L in enumerate(int(x) for x in lengths):
        for start_m in range(0, min(seq_len, L), block_m):
            rows = m[bz, start_m:min(start_m + block_m, L)]
            if bool((rows > 0).any()):
                total += math.ceil(L / block_n)
            else:
                total += math.ceil(min(start_m + block_m, L) / block_n)
    return total * heads
