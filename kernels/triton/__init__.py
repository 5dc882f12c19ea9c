"""Triton kernels, one module per family, each matching its reference in kernels/reference.py.

Import the submodules only when a CUDA tensor (or, in tests, the interpreter) needs them:
``triton.jit`` reads TRITON_INTERPRET when a kernel is decorated, so importing them early would fix
the mode before the caller had a say. This package file therefore imports nothing.
"""
