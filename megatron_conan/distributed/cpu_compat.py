"""Lets megatron-core run over gloo on a CPU-only machine (tests, the tiny quickstart).

megatron-core assumes CUDA in a handful of places: the RNG
tracker, ``torch.cuda.current_device()`` as a device argument, ``device="cuda"`` tensor factories,
``torch.cuda.synchronize()``, ``Tensor.cuda()``, and ``param.type() == "torch.cuda.FloatTensor"``
checks in the optimizer and grad clipping. :func:`enable_cpu_compat` routes each of them to the CPU.

It only acts where CUDA is absent: on a machine with a GPU it returns ``False`` and changes nothing,
so GPU behaviour is never altered. Every patch is a plain function replacement applied once per
process; :func:`cpu_compat_active` reports whether it happened.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

_ACTIVE = False

# Factories that megatron-core calls with device="cuda" (or torch.cuda.current_device()).
_FACTORY_NAMES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "as_tensor",
    "empty_strided", "linspace",
)

# What Tensor.type() returns on CUDA: megatron's optimizers accept only these names.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def cpu_compat_active() -> bool:
    """Whether the CPU routing is installed in this process."""
    return _ACTIVE


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):
        return True  # an ordinal means a CUDA device to torch
    return isinstance(device, str) and device.startswith("cuda")


def _route_device(fn):
    @functools.wraps(fn)
    def routed(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA allocator
        return fn(*args, **kwargs)

    routed.__conan_cpu_routed__ = True
    return routed


def _patch_factories() -> None:
    # `with torch.device("meta")` recognises factories by identity from a cached set: fill the
    # cache with the original functions before they are replaced.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORY_NAMES:
        original = getattr(torch, name)
        if not getattr(original, "__conan_cpu_routed__", False):
            setattr(torch, name, _route_device(original))


def _patch_tensor_methods() -> None:
    original_type = torch.Tensor.type
    original_to = torch.Tensor.to

    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return original_type(self, dtype, non_blocking, **kwargs)

    def to(self, *args, **kwargs):
        args = tuple("cpu" if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    torch.Tensor.cuda = cuda
    torch.Tensor.type = tensor_type
    torch.Tensor.to = to


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # The CUDA generator's role falls to the CPU one; torch.manual_seed itself calls
    # cuda.manual_seed_all, so that one must not recurse into it.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_allocated = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


def _patch_megatron() -> None:
    """Megatron's RNG tracker reads the CUDA generator directly: point it at the CPU one."""
    from megatron.core.tensor_parallel import random as tp_random

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    tp_random._get_cuda_rng_state = get_rng_state
    tp_random._set_cuda_rng_state = set_rng_state


def enable_cpu_compat() -> bool:
    """Install the CPU routing if CUDA is absent. Idempotent; returns whether it is active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    _patch_factories()
    _patch_tensor_methods()
    _patch_torch_cuda()
    _patch_megatron()
    _ACTIVE = True
    logger.debug("megatron-core CPU compatibility routing enabled")
    return True
