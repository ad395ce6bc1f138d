"""Issue 31: Triton 3.6's interpreter (the GPU node's) with NumPy 2.5 turns a scalar into a loop
bound with int() of a 1-element array, which NumPy 2.5 refuses; the shim gives it Triton 3.7's
squeeze, undone with the interpreter's other patches, and leaves a fixed Triton alone. The
rehearsal's suite runs the real interpreter kernels on Triton 3.6 (docs/GPU.md)."""

import types

import numpy
import pytest

interpreter = pytest.importorskip("triton.runtime.interpreter")

from megatron_conan.ops.soft_mask_attention import triton_interpreter  # noqa: E402


class _Scope:
    """The interpreter's patch scope: set attributes, restore them last-set-first."""

    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, original = self.changes.pop()
            setattr(obj, name, original)


def _old_patch_lang_tensor(tensor, scope):
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def test_an_old_interpreter_gets_the_squeeze_and_a_fixed_one_is_left_alone(monkeypatch):
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    assert triton_interpreter.squeeze_scalar_index()
    assert triton_interpreter.squeeze_scalar_index()  # once only
    patched = interpreter._patch_lang_tensor

    class Tensor:
        def __init__(self, data):
            self.handle = types.SimpleNamespace(data=data)

    scope = _Scope()
    patched(Tensor, scope)
    assert list(range(Tensor(numpy.array([1], dtype=numpy.int32)), 4)) == [1, 2, 3]
    scope.restore()
    assert not hasattr(Tensor, "__index__") or Tensor.__index__ is None

    def fixed(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", fixed)
    assert not triton_interpreter.squeeze_scalar_index() and interpreter._patch_lang_tensor is fixed
