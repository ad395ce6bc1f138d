"""Triton's interpreter (TRITON_INTERPRET=1, the CPU stand-in the tests and the CPU GPU check use)
on the GPU node's versions: Triton 3.6's interpreter turns a scalar into a loop bound with
``int(self.handle.data)``, a 1-element array, which NumPy 2.5 refuses ("only 0-dimensional arrays
can be converted to Python scalars"), so every kernel with a runtime loop bound fails there on CPU.
Triton 3.7 squeezes the array first; :func:`squeeze_scalar_index` applies that same fix to an older
interpreter. Compiled kernels (a GPU) never run this code, and a fixed Triton is left alone.
"""

from __future__ import annotations

import inspect

_OLD_INDEX = "int(self.handle.data))"


def squeeze_scalar_index() -> bool:
    """Patch an interpreter with the old index conversion; whether it was patched (now or before)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "squeezes_scalar_index", False):
        return True
    if _OLD_INDEX not in inspect.getsource(original):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # the interpreter's scope restores attributes last-set-first, so this undoes cleanly too
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
