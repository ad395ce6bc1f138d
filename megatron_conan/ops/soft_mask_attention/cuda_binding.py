"""Loads the CUDA extension built from csrc/ (`megatron_conan_soft_mask_cuda`), if it was built.

Its contract is the Triton kernel's (see `triton_kernel.py` and `reference.py`):
    forward(q, k, v, m, lengths, softmax_scale, block_counter or None, cuda_stream) -> (out, lse)
    backward(grad_out, q, k, v, out, lse, m, lengths, softmax_scale, cuda_stream) -> (dq, dk, dv)
with q [b, hq, s, d], k/v [b, hkv, s, d] on the GPU (fp16, bf16 or fp32; d <= 128, stride 1 on d),
m float32 [b, s], lengths int32 [b]. The backward is always deterministic. The extension does not
include c10/cuda headers (see csrc/soft_mask_attention.cu): the wrappers here make the tensors'
device current and pass the current stream.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

EXTENSION_NAME = "megatron_conan_soft_mask_cuda"
MAX_HEAD_DIM = 128  # kMaxHeadDim in csrc/soft_mask_attention.cu


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled module, or None where it was not built (CPU machines, skipped build)."""
    try:
        import importlib

        return importlib.import_module(EXTENSION_NAME)
    except ImportError:
        return None


def is_available() -> bool:
    return load_extension() is not None


def _require():
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"the CUDA soft-mask extension ({EXTENSION_NAME}) is not built: install "
                           "with CUDA present and MEGATRON_CONAN_SKIP_CUDA_EXT unset, or pick the "
                           "triton/reference backend")
    return ext


def soft_mask_attention_cuda_forward(q, k, v, m, lengths, softmax_scale: float,
                                     block_counter: Optional[torch.Tensor] = None
                                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    ext = _require()
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        out, lse = ext.forward(q, k, v, m.float().contiguous(), lengths.int().contiguous(),
                               float(softmax_scale), block_counter, stream)
    return out, lse


def soft_mask_attention_cuda_backward(grad_out, q, k, v, out, lse, m, lengths, softmax_scale: float
                                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ext = _require()
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        dq, dk, dv = ext.backward(grad_out, q, k, v, out, lse, m.float().contiguous(),
                                  lengths.int().contiguous(), float(softmax_scale), stream)
    return dq, dk, dv
