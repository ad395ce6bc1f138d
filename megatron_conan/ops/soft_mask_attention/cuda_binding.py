"""Loads the CUDA extension built from csrc/ (`megatron_conan_soft_mask_cuda`), if it was built.

Its contract is the Triton kernel's (see `triton_kernel.py` and `reference.py`):
    forward(q, k, v, m, lengths, softmax_scale, block_counter or None, cuda_stream,
            key_lo=None, key_hi=None) -> (out, lse)
    backward(grad_out, q, k, v, out, lse, m, lengths, softmax_scale, cuda_stream,
             key_lo=None, key_hi=None) -> (dq, dk, dv)
with q [b, hq, s, d], k/v [b, hkv, s, d] on the GPU (fp16, bf16 or fp32; d <= 128, stride 1 on d),
m float32 [b, s], lengths int32 [b], and for packed rows the key windows (lo, hi), contiguous int32
[b, s] each (`reference.key_windows_from_cu_seqlens`; without them, right-padded rows of `lengths`).
Key tiles outside a query block's windows are skipped; the block counter counts what
`triton_kernel.windowed_block_count(m, windows, hq, QUERY_BLOCK, KEY_TILE)` counts. The backward
is always deterministic. The extension does not include c10/cuda headers (see
csrc/soft_mask_attention.cu): the wrappers here make the tensors' device current and pass the
current stream.

Architectures: setup.py builds SASS for every architecture of :data:`ARCHITECTURES` that the nvcc
at hand supports (:func:`architectures_for_toolkit`) and compiles the list into the extension
(``compiled_archs``); :func:`runs_on` says whether a GPU can run that build (a cubin for sm_XY runs
on sm_XZ with Z >= Y; an arch-specific ``a`` build only on its own GPU). This file imports nothing
of the package, so that setup.py can load it before the package is installed.
"""

from __future__ import annotations

import functools
import re
from typing import List, Optional, Sequence, Tuple

import torch

EXTENSION_NAME = "megatron_conan_soft_mask_cuda"
MAX_HEAD_DIM = 128  # kMaxHeadDim in csrc/soft_mask_attention.cu
QUERY_BLOCK = 16  # kBlockRows: query rows per thread block
KEY_TILE = 32  # kTile: keys per shared-memory tile
ARCHS_MACRO = "MEGATRON_CONAN_CUDA_ARCHS"
"""The preprocessor define through which setup.py compiles the architecture list into the binding."""

ARCHITECTURES: Tuple[Tuple[str, Tuple[int, int]], ...] = (
    ("80", (11, 0)),   # A100
    ("86", (11, 1)),   # A10, A40, RTX 30xx
    ("89", (11, 8)),   # L4, L40, RTX 40xx
    ("90a", (12, 0)),  # H100, H200 (arch-specific: runs on sm_90 only)
    ("100", (12, 8)),  # B200, GB200
)
"""The architectures the extension is built for, each with the first CUDA toolkit that knows it."""

LEGACY_ARCHS = ("80", "90a")
"""What extensions built before the list was compiled in were built for."""


def parse_nvcc_version(text: str) -> Tuple[int, int]:
    """(major, minor) from ``nvcc --version`` output ("... release 12.4, V12.4.131")."""
    found = re.search(r"release (\d+)\.(\d+)", text)
    if found is None:
        raise ValueError(f"no 'release X.Y' in nvcc --version output: {text.strip()[:200]!r}")
    return int(found.group(1)), int(found.group(2))


def architectures_for_toolkit(version: Tuple[int, int]) -> List[str]:
    """The architectures of :data:`ARCHITECTURES` that CUDA `version` can compile for."""
    return [arch for arch, first in ARCHITECTURES if tuple(version) >= first]


def gencode_flags(archs: Sequence[str]) -> List[str]:
    """nvcc flags building SASS (no PTX) for `archs`: the extension then loads only where it runs
    natively, and `runs_on` can tell where that is."""
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]


def archs_define(archs: Sequence[str]) -> str:
    """The compiler flag that puts `archs` into the binding: ``-DMEGATRON_CONAN_CUDA_ARCHS=sm80_sm90a``,
    one identifier (the binding stringifies it), since quotes do not survive every build path."""
    return f"-D{ARCHS_MACRO}=" + "_".join(f"sm{arch}" for arch in archs)


def decode_archs(text: str) -> Tuple[str, ...]:
    """``"sm80_sm90a"`` (the binding's ``compiled_archs``) -> ("80", "90a"); () when unknown."""
    return tuple(part[2:] for part in text.split("_") if re.fullmatch(r"sm\d+a?", part))


def _arch_number(arch: str) -> Tuple[int, int, bool]:
    """"90a" -> (9, 0, True); "100" -> (10, 0, False)."""
    specific = arch.endswith("a")
    digits = arch.rstrip("a")
    return int(digits[:-1]), int(digits[-1]), specific


def runs_on(capability: Tuple[int, int], archs: Sequence[str]) -> bool:
    """Whether a build with SASS for `archs` runs on a GPU of compute `capability` (major, minor)."""
    major, minor = capability
    for arch in archs:
        arch_major, arch_minor, specific = _arch_number(arch)
        if specific and (major, minor) == (arch_major, arch_minor):
            return True
        if not specific and major == arch_major and minor >= arch_minor:
            return True
    return False


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


def compiled_archs() -> Optional[Tuple[str, ...]]:
    """The architectures the installed extension was built for; None where it is not built."""
    ext = load_extension()
    if ext is None:
        return None
    return decode_archs(getattr(ext, "compiled_archs", "")) or LEGACY_ARCHS


def _require():
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"the CUDA soft-mask extension ({EXTENSION_NAME}) is not built: install "
                           "with CUDA present and MEGATRON_CONAN_SKIP_CUDA_EXT unset, or pick the "
                           "triton/reference backend")
    return ext


def key_window_arguments(windows: Optional[Tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(key_lo, key_hi) as the extension takes them: contiguous int32 [b, s] on q's device, or
    (None, None) for right-padded rows. Checked here, before the extension is needed, so that a
    wrong shape is the same ValueError with or without a GPU."""
    if windows is None:
        return None, None
    if len(windows) != 2:
        raise ValueError(f"key windows must be a pair (lo, hi); got {len(windows)} tensors")
    batch, _, seq_len, _ = q.shape
    lo, hi = windows
    if tuple(lo.shape) != (batch, seq_len) or tuple(hi.shape) != (batch, seq_len):
        raise ValueError(f"key windows must be [b={batch}, s={seq_len}]; got {tuple(lo.shape)}, "
                         f"{tuple(hi.shape)}")
    return tuple(w.to(device=q.device, dtype=torch.int32).contiguous() for w in (lo, hi))


def _window_keywords(windows, q) -> dict:
    """The extension's key-window arguments, only for packed rows: padded rows call it exactly as
    before the windows existed."""
    if windows is None:
        return {}
    key_lo, key_hi = key_window_arguments(windows, q)
    return {"key_lo": key_lo, "key_hi": key_hi}


def soft_mask_attention_cuda_forward(q, k, v, m, lengths, softmax_scale: float,
                                     block_counter: Optional[torch.Tensor] = None,
                                     windows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """`windows`: packed rows' key windows (lo, hi); without them, right-padded rows of `lengths`."""
    packed = _window_keywords(windows, q)
    ext = _require()
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        out, lse = ext.forward(q, k, v, m.float().contiguous(), lengths.int().contiguous(),
                               float(softmax_scale), block_counter, stream, **packed)
    return out, lse


def soft_mask_attention_cuda_backward(grad_out, q, k, v, out, lse, m, lengths, softmax_scale: float,
                                      windows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the forward with the same `windows`."""
    packed = _window_keywords(windows, q)
    ext = _require()
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        dq, dk, dv = ext.backward(grad_out, q, k, v, out, lse, m.float().contiguous(),
                                  lengths.int().contiguous(), float(softmax_scale), stream, **packed)
    return dq, dk, dv
