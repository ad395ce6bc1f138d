"""Soft-mask kernel checks shared by the kernel tests and ``conan-gpu-check``: inputs, the
reference with its gradients, and docs/DESIGN.md section 4's bound (the kernel's error at most 2x the error of
the same PyTorch computation in the kernel's precision)."""

from typing import Dict, List, Sequence

import torch

from megatron_conan.ops.soft_mask_attention.reference import (Windows, key_windows_from_cu_seqlens,
                                                              soft_mask_attention_reference)

# Below these absolute errors the 2x rule compares rounding noise with rounding noise.
ERROR_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def make_inputs(seed, b, hq, hkv, s, d, dtype, device) -> List[torch.Tensor]:
    """q [b, hq, s, d], k and v [b, hkv, s, d], and an output gradient like q."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    grad = torch.randn(b, hq, s, d, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, grad)]


def packed_windows(rows: Sequence[Sequence[int]], width: int) -> Windows:
    """Key windows (lo, hi) [len(rows), width] of packed rows, each given as the lengths of its texts,
    back to back from position 0 (the rest of the row is padding), through megatron's cu_seqlens."""
    lengths, starts = [], []
    for r, texts in enumerate(rows):
        offset = r * width
        for length in texts:
            lengths.append(length)
            starts.append(offset)
            offset += length
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return key_windows_from_cu_seqlens(cu, torch.tensor(starts + [len(rows) * width], dtype=torch.int32),
                                       len(rows), width)


def reference_with_grads(q, k, v, grad, m, lengths, dtype, windows=None) -> List[torch.Tensor]:
    """Output and (dq, dk, dv) of the PyTorch reference computed in `dtype` (packed rows with
    `windows`)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = soft_mask_attention_reference(*leaves, m, lengths, windows=windows)
    out.backward(grad.to(dtype))
    return [out.detach()] + [x.grad for x in leaves]


def kernel_error(kernel: torch.Tensor, torch_low: torch.Tensor, ref: torch.Tensor, dtype) -> Dict[str, float]:
    """The kernel's and PyTorch's max error against `ref`, the bound, and whether the kernel is within it."""
    err_kernel = (kernel.double() - ref.double()).abs().max().item()
    err_torch = (torch_low.double() - ref.double()).abs().max().item()
    bound = 2 * err_torch + ERROR_FLOOR[dtype]
    return {"error": err_kernel, "torch_error": err_torch, "bound": bound, "ok": err_kernel <= bound}
