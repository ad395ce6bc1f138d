"""The CUDA extension against the fp64 reference on a GPU (skipped on CPU and where the extension
was not built), right-padded and packed rows; the block-count rule it is held to runs on CPU."""

import pytest
import torch

from megatron_conan.ops.soft_mask_attention.reference import key_windows_from_lengths
from megatron_conan.ops.soft_mask_attention.schedule import row_mask_weights, windowed_row_mask_weights

from .soft_mask_checks import assert_within_bound, make_inputs, packed_windows, reference_with_grads

CASES = [  # (seq, lengths, hq, hkv, a, position_scale)
    (128, (128, 77), 32, 8, 0.3, "len_over_pos"),
    (1000, (1000, 613), 32, 8, 0.0, "len_over_pos"),
    (1000, (1000, 999), 32, 8, 1.0, "none"),
    (517, (517, 300), 8, 2, 0.2, "pos_over_len"),
]


def _extension():
    from megatron_conan.ops.soft_mask_attention import cuda_binding

    if not cuda_binding.is_available():
        pytest.skip("CUDA extension not built")
    return cuda_binding


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"s{c[0]}_a{c[4]}_{c[5]}")
def test_cuda_matches_reference(case, dtype):
    cuda_binding = _extension()
    from megatron_conan.ops.soft_mask_attention.function import soft_mask_attention

    s, lengths, hq, hkv, a, position_scale = case
    q, k, v, grad = make_inputs(s, len(lengths), hq, hkv, s, 112, dtype, "cuda")
    lengths = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    m = row_mask_weights(a, lengths, s, position_scale)
    ref = reference_with_grads(q.float(), k.float(), v.float(), grad.float(), m, lengths,
                               torch.float64)
    low = reference_with_grads(q, k, v, grad, m, lengths, dtype)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = soft_mask_attention(*leaves, m, lengths, backend="cuda")
    out.backward(grad)
    for name, got, expected, torch_low in zip(("out", "dq", "dk", "dv"),
                                              [out.detach()] + [x.grad for x in leaves], ref, low):
        assert_within_bound(got, torch_low, expected, name, dtype)
    assert cuda_binding.is_available()


@pytest.mark.gpu
def test_cuda_block_skipping():
    _extension()
    from megatron_conan.ops.soft_mask_attention.function import soft_mask_attention

    q, k, v, _ = make_inputs(0, 1, 4, 1, 256, 112, torch.float16, "cuda")
    lengths = torch.tensor([256], dtype=torch.int32, device="cuda")
    counts = []
    for a in (0.0, 0.5):
        counter = torch.zeros(1, dtype=torch.int32, device="cuda")
        soft_mask_attention(q, k, v, row_mask_weights(a, lengths, 256), lengths, backend="cuda",
                            block_counter=counter)
        counts.append(int(counter.item()))
    # query blocks of 16 rows, key tiles of 32: causal visits ceil((16 r + 16) / 32) tiles
    assert counts == [4 * _causal_tiles_of_one_padded_row(16), 4 * 16 * 8]


# Packed rows over 160 positions (10 query blocks of 16, 5 key tiles of 32): the first exactly full,
# with texts of length 1 and texts crossing tile boundaries; the second ragged, padded after 100.
PACKED_ROWS = [[1, 47, 1, 63, 48], [30, 1, 19, 50]]
PACKED_WIDTH = 160


def _causal_tiles_of_one_padded_row(query_blocks):
    """Key tiles of 32 that query blocks of 16 visit on a full row at a = 0: up to each diagonal."""
    return sum(-(-(16 * r + 16) // 32) for r in range(query_blocks))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
def test_cuda_packed_rows_match_reference(a, dtype):
    _extension()
    from megatron_conan.ops.soft_mask_attention.function import soft_mask_attention

    lo, hi = (w.cuda() for w in packed_windows(PACKED_ROWS, PACKED_WIDTH))
    q, k, v, grad = make_inputs(11, len(PACKED_ROWS), 4, 2, PACKED_WIDTH, 112, dtype, "cuda")
    m = windowed_row_mask_weights(a, lo, hi)
    lengths = hi.max(dim=1).values  # unused with windows
    ref = reference_with_grads(q.float(), k.float(), v.float(), grad.float(), m, lengths, torch.float64,
                               windows=(lo, hi))
    low = reference_with_grads(q, k, v, grad, m, lengths, dtype, windows=(lo, hi))
    grads = []
    for _ in range(2):  # twice: the backward is deterministic
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = soft_mask_attention(*leaves, m, lengths, backend="cuda", windows=(lo, hi))
        out.backward(grad)
        grads.append([x.grad for x in leaves])
    for name, got, expected, torch_low in zip(("out", "dq", "dk", "dv"), [out.detach()] + grads[1], ref, low):
        assert torch.isfinite(got).all(), name
        assert_within_bound(got, torch_low, expected, name, dtype)
    padding = sum(PACKED_ROWS[1])
    for t in [out] + grads[1]:  # positions in no text: zero output and gradients
        assert torch.count_nonzero(t[1, :, padding:]) == 0
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.gpu
def test_cuda_packed_rows_skip_tiles_of_other_texts():
    _extension()
    from megatron_conan.ops.soft_mask_attention.cuda_binding import KEY_TILE, QUERY_BLOCK
    from megatron_conan.ops.soft_mask_attention.function import soft_mask_attention
    from megatron_conan.ops.soft_mask_attention.triton_kernel import windowed_block_count

    hq = 4
    lo, hi = (w.cuda() for w in packed_windows([[32, 96, 128]], 256))
    q, k, v, _ = make_inputs(12, 1, hq, 1, 256, 112, torch.float16, "cuda")
    counts = {}
    for a in (0.0, 1.0):
        m = windowed_row_mask_weights(a, lo, hi)
        counter = torch.zeros(1, dtype=torch.int32, device="cuda")
        soft_mask_attention(q, k, v, m, hi.max(dim=1).values, backend="cuda", block_counter=counter,
                            windows=(lo, hi))
        counts[a] = (int(counter.item()), windowed_block_count(m, (lo, hi), hq, QUERY_BLOCK, KEY_TILE))
    # bidirectional texts of 32, 96 and 128 keys on tile boundaries: (2 * 1 + 6 * 3 + 8 * 4) tiles,
    # not the 16 * 8 of one text of 256; causal: each text's own causal tiles
    assert counts[1.0] == (hq * 52, hq * 52)
    causal = _causal_tiles_of_one_padded_row(2) + _causal_tiles_of_one_padded_row(6) \
        + _causal_tiles_of_one_padded_row(8)
    assert counts[0.0] == (hq * causal, hq * causal)


def test_padded_rows_count_as_windows_of_their_length():
    """The CUDA kernel's tiles follow triton_kernel.windowed_block_count at its block sizes; on
    right-padded rows that is the count test_cuda_block_skipping expects."""
    pytest.importorskip("triton")
    from megatron_conan.ops.soft_mask_attention.cuda_binding import KEY_TILE, QUERY_BLOCK
    from megatron_conan.ops.soft_mask_attention.triton_kernel import windowed_block_count

    lengths = torch.tensor([256], dtype=torch.int32)
    windows = key_windows_from_lengths(lengths, 256)
    counts = [windowed_block_count(row_mask_weights(a, lengths, 256), windows, 4, QUERY_BLOCK, KEY_TILE)
              for a in (0.0, 0.5)]
    assert counts == [4 * _causal_tiles_of_one_padded_row(16), 4 * 16 * 8]
