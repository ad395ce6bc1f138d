"""Triton kernel cases, run by test_triton_kernel.py in a subprocess.

Not collected directly (the name does not match test_*.py): on CPU they need TRITON_INTERPRET=1 set
before triton is imported, which must not leak into the other tests' process. The same cases run
natively on a GPU with SOFT_MASK_TEST_DEVICE=cuda (then bf16 too).
"""

import os

import pytest
import torch

from megatron_conan.ops.soft_mask_attention.function import soft_mask_attention
from megatron_conan.ops.soft_mask_attention.reference import key_windows_from_lengths
from megatron_conan.ops.soft_mask_attention.schedule import row_mask_weights, windowed_row_mask_weights
from megatron_conan.ops.soft_mask_attention.triton_kernel import (
    causal_block_count, soft_mask_attention_triton_backward, soft_mask_attention_triton_forward,
    visited_block_count, windowed_block_count)

from soft_mask_checks import assert_within_bound, make_inputs, packed_windows, reference_with_grads

DEVICE = os.environ.get("SOFT_MASK_TEST_DEVICE", "cpu")
ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# (seq, lengths, hq, hkv, a, position_scale, block_m, block_n, deterministic)
CASES = [
    (130, (130, 71), 4, 1, 0.3, "len_over_pos", 32, 16, False),
    (100, (100, 37), 4, 2, 0.05, "pos_over_len", 16, 32, True),
    (96, (96, 96), 4, 1, 0.0, "len_over_pos", 32, 32, False),
    (80, (61, 80), 2, 1, 1.0, "none", 64, 64, True),
]
if ON_GPU:
    CASES += [(1000, (1000, 613), 32, 8, 0.3, "len_over_pos", 64, 64, False),
              (4096, (4096, 4096), 32, 8, 0.1, "len_over_pos", 64, 64, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"s{c[0]}_a{c[4]}_{c[5]}_bm{c[6]}bn{c[7]}")
def test_forward_and_grads_match_reference(case, dtype):
    s, lengths, hq, hkv, a, position_scale, block_m, block_n, deterministic = case
    d = 112
    q, k, v, grad = make_inputs(s + sum(lengths), len(lengths), hq, hkv, s, d, dtype, DEVICE)
    lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    m = row_mask_weights(a, lengths, s, position_scale)
    ref = reference_with_grads(q, k, v, grad, m, lengths, torch.float64)
    low = reference_with_grads(q, k, v, grad, m, lengths, dtype)

    out, lse = soft_mask_attention_triton_forward(q, k, v, m, lengths, block_m=block_m,
                                                  block_n=block_n)
    dq, dk, dv = soft_mask_attention_triton_backward(
        grad, q, k, v, out, lse, m, lengths, deterministic=deterministic, block_m=block_m,
        block_n=block_n)
    for name, got, expected, torch_low in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref,
                                              low):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        assert_within_bound(got, torch_low, expected, name, dtype)
    # padded query rows: zero output and zero dq; padded keys: zero dk, dv
    for bz, length in enumerate(lengths.tolist()):
        for t in (out, dq, dk, dv):
            assert torch.count_nonzero(t[bz, :, length:]) == 0


@pytest.mark.parametrize("deterministic", [False, True])
def test_autograd_function_matches_reference(deterministic):
    dtype = torch.float32
    q, k, v, grad = make_inputs(5, 2, 4, 1, 50, 112, dtype, DEVICE)
    lengths = torch.tensor([50, 23], dtype=torch.int32, device=DEVICE)
    m = row_mask_weights(0.4, lengths, 50)
    ref = reference_with_grads(q, k, v, grad, m, lengths, torch.float64)
    low = reference_with_grads(q, k, v, grad, m, lengths, dtype)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = soft_mask_attention(*leaves, m, lengths, backend="triton", deterministic=deterministic)
    out.backward(grad)
    got = [out.detach()] + [x.grad for x in leaves]
    for name, g, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low):
        assert_within_bound(g, lo, r, name, dtype)


def test_deterministic_backward_is_bitwise_repeatable():
    q, k, v, grad = make_inputs(6, 1, 4, 1, 64, 112, torch.float32, DEVICE)
    lengths = torch.tensor([64], dtype=torch.int32, device=DEVICE)
    m = row_mask_weights(0.5, lengths, 64)
    grads = []
    for _ in range(2):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        soft_mask_attention(*leaves, m, lengths, backend="triton", deterministic=True).backward(grad)
        grads.append([x.grad for x in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def _count_blocks(m, lengths, s, hq, block_m, block_n):
    q, k, v, _ = make_inputs(7, len(lengths), hq, 1, s, 112, torch.float32, DEVICE)
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    soft_mask_attention_triton_forward(q, k, v, m, lengths, block_counter=counter,
                                       block_m=block_m, block_n=block_n)
    return int(counter.item())


def test_block_skipping_counts_visited_blocks():
    s, hq, block_m, block_n = 128, 2, 32, 32
    lengths = torch.tensor([128, 90], dtype=torch.int32, device=DEVICE)
    causal = causal_block_count(lengths.tolist(), s, hq, block_m, block_n)
    full = hq * sum(-(-L // block_m) * -(-L // block_n) for L in lengths.tolist())
    # a = 0: exactly the causal blocks
    assert _count_blocks(row_mask_weights(0.0, lengths, s), lengths, s, hq, block_m, block_n) \
        == causal
    # a > 0 with len_over_pos opens every row: every block below the true lengths
    open_all = row_mask_weights(0.1, lengths, s)
    assert _count_blocks(open_all, lengths, s, hq, block_m, block_n) == full > causal
    # only rows of the second query block open in sequence 0: that block's row of blocks is added
    partial = torch.zeros(2, s, device=DEVICE)
    partial[0, 40] = 0.5
    partial[1, 100:] = 0.7  # padded rows (length 90) never open a block
    expected = visited_block_count(partial, lengths.tolist(), s, hq, block_m, block_n)
    assert expected == causal + hq * 2
    assert _count_blocks(partial, lengths, s, hq, block_m, block_n) == expected


# rows of texts: the first exactly full, with texts of length 1; the second ragged with padding
PACKED_ROWS = [[1, 40, 54, 1], [30, 1, 19]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
def test_packed_rows_match_reference(a, dtype):
    s, hq, hkv, d = 96, 4, 2, 32
    lo, hi = (w.to(DEVICE) for w in packed_windows(PACKED_ROWS, s))
    q, k, v, grad = make_inputs(8, 2, hq, hkv, s, d, dtype, DEVICE)
    m = windowed_row_mask_weights(a, lo, hi)
    lengths = hi.max(dim=1).values  # unused with windows
    ref = reference_with_grads(q, k, v, grad, m, lengths, torch.float64, windows=(lo, hi))
    low = reference_with_grads(q, k, v, grad, m, lengths, dtype, windows=(lo, hi))
    out, lse = soft_mask_attention_triton_forward(q, k, v, m, lengths, block_m=32, block_n=16,
                                                  windows=(lo, hi))
    dq, dk, dv = soft_mask_attention_triton_backward(grad, q, k, v, out, lse, m, lengths, block_m=32,
                                                     block_n=16, windows=(lo, hi))
    for name, got, expected, torch_low in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, low):
        assert torch.isfinite(got).all(), name
        assert_within_bound(got, torch_low, expected, name, dtype)
    assert torch.count_nonzero(out[1, :, 50:]) == 0 and torch.count_nonzero(dk[1, :, 50:]) == 0


def test_packed_rows_skip_blocks_of_other_texts():
    s, hq, block = 128, 2, 16
    lo, hi = (w.to(DEVICE) for w in packed_windows([[16, 48, 64], [128]], s))
    m = windowed_row_mask_weights(1.0, lo, hi)
    q, k, v, _ = make_inputs(9, 2, hq, 1, s, 32, torch.float32, DEVICE)
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    soft_mask_attention_triton_forward(q, k, v, m, hi.max(dim=1).values, block_counter=counter,
                                       block_m=block, block_n=block, windows=(lo, hi))
    expected = windowed_block_count(m, (lo, hi), hq, block, block)
    # bidirectional texts of 16, 48 and 64 tokens on block boundaries: (1 + 9 + 16) blocks, not 64
    assert int(counter.item()) == expected == hq * (1 + 9 + 16 + 64)
    padded = key_windows_from_lengths(torch.tensor([128, 128], device=DEVICE), s)
    assert windowed_block_count(m, padded, hq, block, block) == hq * 128
