"""Shared helpers for the soft-mask kernel tests (CPU interpret mode and GPU); the checks themselves
live in the package, where conan-gpu-check uses them too."""

from megatron_conan.testing.soft_mask import (ERROR_FLOOR, kernel_error, make_inputs, packed_windows,
                                              reference_with_grads)

__all__ = ["ERROR_FLOOR", "assert_within_bound", "make_inputs", "packed_windows", "reference_with_grads"]


def assert_within_bound(kernel, torch_low, ref, name, dtype):
    """docs/DESIGN.md section 4: kernel error <= 2x the error of PyTorch in the kernel's precision."""
    found = kernel_error(kernel, torch_low, ref, dtype)
    assert found["ok"], (f"{name}: kernel error {found['error']:.3e} > bound {found['bound']:.3e} "
                         f"(PyTorch {dtype} error {found['torch_error']:.3e})")
