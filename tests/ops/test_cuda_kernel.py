"""The CUDA extension against the fp64 reference on a GPU (skipped on CPU and where the extension
was not built)."""

import pytest
import torch

from megatron_conan.ops.soft_mask_attention.schedule import row_mask_weights

from .soft_mask_checks import assert_within_bound, make_inputs, reference_with_grads

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
    causal = 4 * sum(-(-(16 * r + 16) // 32) for r in range(16))
    assert counts == [causal, 4 * 16 * 8]
