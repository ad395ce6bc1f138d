"""Shared helpers for the soft-mask kernel tests (CPU interpret mode and GPU)."""

import torch

from megatron_conan.ops.soft_mask_attention.reference import soft_mask_attention_reference

# Below these absolute errors the 2x rule compares rounding noise with rounding noise.
ERROR_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def make_inputs(seed, b, hq, hkv, s, d, dtype, device):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    grad = torch.randn(b, hq, s, d, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, grad)]


def reference_with_grads(q, k, v, grad, m, lengths, dtype):
    """Output and (dq, dk, dv) of the PyTorch reference computed in `dtype`."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = soft_mask_attention_reference(*leaves, m, lengths)
    out.backward(grad.to(dtype))
    return [out.detach()] + [x.grad for x in leaves]


def assert_within_bound(kernel, torch_low, ref, name, dtype):
    """STYLE.md item 4: kernel error <= 2x the error of PyTorch in the kernel's precision."""
    err_kernel = (kernel.double() - ref.double()).abs().max().item()
    err_torch = (torch_low.double() - ref.double()).abs().max().item()
    bound = 2 * err_torch + ERROR_FLOOR[dtype]
    assert err_kernel <= bound, (f"{name}: kernel error {err_kernel:.3e} > bound {bound:.3e} "
                                 f"(PyTorch {dtype} error {err_torch:.3e})")
