"""Test-wide setup: without CUDA, Triton kernels run under the interpreter.

``triton.jit`` reads TRITON_INTERPRET when a kernel is decorated, so this must happen before any
test module imports a kernel module; conftest.py is imported first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns scalars into 1-element arrays and calls ``int()`` on them when a
    kernel loops over ``range(n)``; numpy >= 2.4 refuses that (triton-lang/triton#9171, fixed upstream
    by #9172 after 3.6.0). Re-patch ``__index__`` the way the fix does, only where the bug bites."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


_fix_interpreter_for_numpy_2_4()
