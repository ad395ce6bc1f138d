"""autograd.Function over the fused kernels and the dispatcher `soft_mask_attention`.

Backend choice (`backend="auto"`), decided by :func:`choose_backend` from facts it is given (so the
decision is tested on CPU with any GPU and build injected):

- on a GPU, the fused kernels in :data:`AUTO_ORDER`: Triton first (its tiles use tensor cores; the
  CUDA kernel's fp32 FMA loop does not), then the CUDA extension where it is built with SASS the
  GPU can run (`cuda_binding.runs_on`) and d <= 128;
- otherwise (CPU, or a GPU neither kernel supports) torch's SDPA with log M as a float mask
  (`sdpa`). `reference` is the readable specification (autograd differentiates both directly).

An explicit backend is honoured or refused with an error naming the GPU and the build; `triton` on
CPU tensors needs TRITON_INTERPRET=1 set before triton is imported (tests only: it is slow). A
kernel that fails at launch raises :class:`SoftMaskKernelError` naming the backend and the GPU.

Packed rows (`windows`) go the same way: every backend takes the key windows, so the choice does
not depend on the row layout (`auto` without Triton runs them on the CUDA extension, as it runs
right-padded rows).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Optional, Sequence, Tuple

import torch

from . import cuda_binding
from .reference import (Windows, check_inputs, check_windows, default_softmax_scale, soft_mask_attention_reference,
                        soft_mask_attention_sdpa)
from .schedule import BACKENDS

AUTO_ORDER = ("triton", "cuda")
"""Fused backends `auto` tries on a GPU, fastest first (Triton: tensor-core tiles)."""

TRITON_MIN_CAPABILITY = (8, 0)
"""Triton's kernel needs bf16 tensor-core MMA (sm_80+); older GPUs fall back to SDPA."""


class SoftMaskKernelError(RuntimeError):
    """A fused soft-mask kernel failed to launch or run; the message names the backend and the GPU."""


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the backend choice depends on (gathered by :func:`device_facts`, injected by tests)."""

    device_type: str
    """`cuda` or `cpu`."""
    capability: Optional[Tuple[int, int]] = None
    """The GPU's compute capability, e.g. (9, 0); None off the GPU."""
    gpu_name: str = ""
    """The GPU's name, for error messages."""
    cuda_archs: Optional[Sequence[str]] = None
    """Architectures the CUDA extension was built for (e.g. ("80", "90a")); None when not built."""
    triton_installed: bool = False
    """Whether the triton package can be imported."""
    triton_interpret: bool = False
    """TRITON_INTERPRET=1 (Triton on CPU tensors, tests only)."""

    def describe(self) -> str:
        if self.device_type != "cuda":
            return f"{self.device_type} tensors"
        major, minor = self.capability or (0, 0)
        return f"{self.gpu_name or 'GPU'} (sm_{major}{minor})"


@functools.lru_cache(maxsize=None)
def _gpu(index: int) -> Tuple[Tuple[int, int], str]:
    return tuple(torch.cuda.get_device_capability(index)), torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def device_facts(device: torch.device) -> DeviceFacts:
    """The facts of this process for tensors on `device` (looked up once per GPU: every layer's
    forward asks)."""
    capability, name = _gpu(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else (None, "")
    return DeviceFacts(
        device_type=device.type, capability=capability, gpu_name=name, cuda_archs=cuda_binding.compiled_archs(),
        triton_installed=_triton_installed(), triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
    )


def _cuda_unusable(facts: DeviceFacts, head_dim: Optional[int]) -> Optional[str]:
    """Why the CUDA extension cannot run here, or None when it can."""
    if facts.device_type != "cuda":
        return "needs CUDA tensors"
    if facts.cuda_archs is None:
        return (f"the extension ({cuda_binding.EXTENSION_NAME}) is not built: install with CUDA present and "
                "MEGATRON_CONAN_SKIP_CUDA_EXT unset")
    if not cuda_binding.runs_on(facts.capability, facts.cuda_archs):
        return (f"the extension was built for {', '.join('sm_' + a for a in facts.cuda_archs)}, which "
                f"{facts.describe()} cannot run; rebuild it with a newer nvcc")
    if head_dim is not None and head_dim > cuda_binding.MAX_HEAD_DIM:
        return f"head dim {head_dim} > {cuda_binding.MAX_HEAD_DIM}"
    return None


def _triton_unusable(facts: DeviceFacts) -> Optional[str]:
    """Why the Triton kernel cannot run here, or None when it can."""
    if not facts.triton_installed:
        return "triton is not installed"
    if facts.device_type != "cuda":
        return None if facts.triton_interpret else ("needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                                                    "triton is first imported)")
    if tuple(facts.capability) < TRITON_MIN_CAPABILITY:
        return f"{facts.describe()} is older than sm_{TRITON_MIN_CAPABILITY[0]}{TRITON_MIN_CAPABILITY[1]}"
    return None


def choose_backend(backend: str, facts: DeviceFacts, head_dim: Optional[int] = None) -> str:
    """The backend that runs `backend` ("auto" or explicit) for tensors described by `facts`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    unusable = {"cuda": lambda: _cuda_unusable(facts, head_dim), "triton": lambda: _triton_unusable(facts)}
    if backend == "auto":
        if facts.device_type == "cuda":
            for candidate in AUTO_ORDER:
                if unusable[candidate]() is None:
                    return candidate
        return "sdpa"
    if backend in unusable:
        reason = unusable[backend]()
        if reason is not None:
            raise RuntimeError(f"soft-mask attention backend {backend!r} cannot run on {facts.describe()}: {reason}")
    return backend


def resolve_backend(backend: str, device: torch.device, head_dim: Optional[int] = None) -> str:
    """The backend that will run for tensors on `device` (see :func:`choose_backend`)."""
    return choose_backend(backend, device_facts(device), head_dim)


def _launch(backend: str, device: torch.device, kernel, *args):
    """Run a fused kernel; a failure names the backend and the GPU (the original error is chained)."""
    try:
        return kernel(*args)
    except Exception as error:  # noqa: BLE001 - re-raised with where it happened
        facts = device_facts(device)
        build = f"; extension built for {', '.join(facts.cuda_archs)}" if backend == "cuda" and facts.cuda_archs else ""
        raise SoftMaskKernelError(f"soft-mask attention backend {backend!r} failed on {facts.describe()}{build}: "
                                  f"{type(error).__name__}: {error}") from error


class SoftMaskAttentionFunction(torch.autograd.Function):
    """Fused forward/backward; saves q, k, v, out and the LSE (no [s, s] tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, m, lengths, softmax_scale, backend, deterministic, block_counter, windows):
        if backend == "cuda":
            out, lse = _launch(backend, q.device, cuda_binding.soft_mask_attention_cuda_forward,
                               q, k, v, m, lengths, softmax_scale, block_counter, windows)
        else:
            from .triton_kernel import soft_mask_attention_triton_forward

            out, lse = _launch(backend, q.device, lambda: soft_mask_attention_triton_forward(
                q, k, v, m, lengths, softmax_scale, block_counter=block_counter, windows=windows))
        ctx.save_for_backward(q, k, v, out, lse, m, lengths, *(windows or ()))
        ctx.softmax_scale = softmax_scale
        ctx.backend = backend
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, m, lengths, *windows = ctx.saved_tensors
        windows = tuple(windows) or None
        if ctx.backend == "cuda":
            dq, dk, dv = _launch(ctx.backend, q.device, cuda_binding.soft_mask_attention_cuda_backward,
                                 grad_out.contiguous(), q, k, v, out, lse, m, lengths, ctx.softmax_scale,
                                 windows)
        else:
            from .triton_kernel import soft_mask_attention_triton_backward

            dq, dk, dv = _launch(ctx.backend, q.device, lambda: soft_mask_attention_triton_backward(
                grad_out, q, k, v, out, lse, m, lengths, ctx.softmax_scale, deterministic=ctx.deterministic,
                windows=windows))
        return dq, dk, dv, None, None, None, None, None, None, None


def soft_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor,
                        lengths: torch.Tensor, softmax_scale: Optional[float] = None,
                        backend: str = "auto", deterministic: bool = False,
                        block_counter: Optional[torch.Tensor] = None,
                        windows: Optional[Windows] = None) -> torch.Tensor:
    """Soft-mask attention, out [b, hq, s, d], layout and maths as in `reference.py`.

    q [b, hq, s, d]; k, v [b, hkv, s, d]; m float32 [b, s]; lengths int32 [b] (right padding).
    `windows`: packed rows, the key windows (lo, hi) int32 [b, s] built from megatron's cu_seqlens
    by `reference.key_windows_from_cu_seqlens` (`lengths` is then unused).
    `block_counter` (int32 [1], fused backends only) is incremented per key block visited.
    """
    check_inputs(q, k, v, m, lengths)
    scale = default_softmax_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    chosen = resolve_backend(backend, q.device, q.shape[-1])
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    m = m.to(device=q.device, dtype=torch.float32)
    if windows is not None:
        check_windows(windows, q.shape[0], q.shape[2])
        windows = tuple(w.to(device=q.device, dtype=torch.int32) for w in windows)
    if chosen == "reference":
        return soft_mask_attention_reference(q, k, v, m, lengths, scale, windows=windows)
    if chosen == "sdpa":
        return soft_mask_attention_sdpa(q, k, v, m, lengths, scale, windows=windows)
    out, _ = SoftMaskAttentionFunction.apply(q, k, v, m, lengths, scale, chosen, deterministic,
                                             block_counter, windows)
    return out
