"""autograd.Function over the fused kernels and the dispatcher `soft_mask_attention`.

Backend choice (`backend="auto"`): the CUDA extension when it is built and the tensors are on a GPU,
else Triton on a GPU, else torch's fused SDPA with log M as a float mask (`sdpa`, the CPU path);
`reference` is the readable specification (autograd differentiates both directly). An
explicit backend is honoured or raises; `triton` on CPU tensors needs TRITON_INTERPRET=1 set before
triton is imported (tests only: it is slow).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from . import cuda_binding
from .reference import check_inputs, default_softmax_scale, soft_mask_attention_reference, soft_mask_attention_sdpa
from .schedule import BACKENDS


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = device.type == "cuda"
    if backend == "auto":
        if on_gpu and cuda_binding.is_available():
            return "cuda"
        if on_gpu and _triton_installed():
            return "triton"
        return "sdpa"
    if backend == "cuda":
        if not on_gpu:
            raise RuntimeError("backend='cuda' needs CUDA tensors")
        if not cuda_binding.is_available():
            cuda_binding._require()
    if backend == "triton":
        if not _triton_installed():
            raise RuntimeError("backend='triton' but triton is not installed")
        if not on_gpu and not _triton_interpret():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "triton is first imported")
    return backend


class SoftMaskAttentionFunction(torch.autograd.Function):
    """Fused forward/backward; saves q, k, v, out and the LSE (no [s, s] tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, m, lengths, softmax_scale, backend, deterministic, block_counter):
        if backend == "cuda":
            out, lse = cuda_binding.soft_mask_attention_cuda_forward(
                q, k, v, m, lengths, softmax_scale, block_counter)
        else:
            from .triton_kernel import soft_mask_attention_triton_forward

            out, lse = soft_mask_attention_triton_forward(q, k, v, m, lengths, softmax_scale,
                                                          block_counter=block_counter)
        ctx.save_for_backward(q, k, v, out, lse, m, lengths)
        ctx.softmax_scale = softmax_scale
        ctx.backend = backend
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, m, lengths = ctx.saved_tensors
        if ctx.backend == "cuda":
            dq, dk, dv = cuda_binding.soft_mask_attention_cuda_backward(
                grad_out.contiguous(), q, k, v, out, lse, m, lengths, ctx.softmax_scale)
        else:
            from .triton_kernel import soft_mask_attention_triton_backward

            dq, dk, dv = soft_mask_attention_triton_backward(
                grad_out, q, k, v, out, lse, m, lengths, ctx.softmax_scale,
                deterministic=ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None, None


def soft_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor,
                        lengths: torch.Tensor, softmax_scale: Optional[float] = None,
                        backend: str = "auto", deterministic: bool = False,
                        block_counter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft-mask attention, out [b, hq, s, d], layout and maths as in `reference.py`.

    q [b, hq, s, d]; k, v [b, hkv, s, d]; m float32 [b, s]; lengths int32 [b] (right padding).
    `block_counter` (int32 [1], fused backends only) is incremented per key block visited.
    """
    check_inputs(q, k, v, m, lengths)
    scale = default_softmax_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    chosen = resolve_backend(backend, q.device)
    if backend == "auto" and chosen == "cuda" and q.shape[-1] > cuda_binding.MAX_HEAD_DIM:
        chosen = "triton"
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    m = m.to(device=q.device, dtype=torch.float32)
    if chosen == "reference":
        return soft_mask_attention_reference(q, k, v, m, lengths, scale)
    if chosen == "sdpa":
        return soft_mask_attention_sdpa(q, k, v, m, lengths, scale)
    out, _ = SoftMaskAttentionFunction.apply(q, k, v, m, lengths, scale, chosen, deterministic,
                                             block_counter)
    return out
