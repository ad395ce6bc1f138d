"""ConanRMSNorm: x / sqrt(mean(x^2) + eps) * weight in float32, cast back (the maths of Hugging Face's
LlamaRMSNorm, which the export relies on), forward and gradients, against the formula written out."""

import pytest
import torch

from megatron_conan.config.model import ParallelConfig, tiny
from megatron_conan.models.transformer_config import build_transformer_config
from megatron_conan.ops.norms import ConanRMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_formula(dtype):
    config = build_transformer_config(tiny(), ParallelConfig())
    norm = ConanRMSNorm(config, 64, eps=1e-5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=generator))
    x = (3 * torch.randn(5, 2, 64, generator=generator)).to(dtype).requires_grad_()
    ours = norm(x)
    grads = torch.autograd.grad((ours.float() ** 2).sum(), (x, norm.weight))

    x_ref = x.detach().clone().requires_grad_()
    weight = norm.weight.detach().clone().requires_grad_()
    wide = x_ref.float()
    expected = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()).to(dtype)
    expected_grads = torch.autograd.grad((expected.float() ** 2).sum(), (x_ref, weight))

    assert ours.dtype == dtype
    assert torch.allclose(ours.float(), expected.float(), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-5)
