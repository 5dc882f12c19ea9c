"""Every Triton launch goes through ``launch``, so that start-up can compile all kernels at once.

Triton compiles a kernel variant on its first launch, one after another, a few seconds each for
the attention kernel: a first start on a machine with an empty Triton cache spent most of its time
there. Inside ``parallel_compile`` a launch only *submits* the compile of its variant to a thread
pool (Triton's AsyncCompileMode; the compile releases the GIL for its MLIR passes and ptxas) and
returns without running anything, so one pass over the shapes a step can take queues every variant,
and leaving the block waits for all of them. The outputs of Triton kernels inside the block are
garbage: it is for warm-up passes over dummy inputs only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import triton

# A ContextVar rather than a flag: Triton keys its own compile mode the same way, and the setting
# stays with the thread (or task) that runs the warm-up.
_COMPILE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("triton_compile_only", default=False)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or only its compile inside ``parallel_compile``."""
    if _COMPILE_ONLY.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def parallel_compile(max_workers: int) -> Iterator[None]:
    """Compile, on ``max_workers`` threads, every kernel variant launched inside the block; the
    block's exit waits for the compiles and raises the first compile error."""
    pool = ThreadPoolExecutor(max_workers, thread_name_prefix="triton-compile")
    with pool, triton.AsyncCompileMode(pool):
        token = _COMPILE_ONLY.set(True)
        try:
            yield
        finally:
            _COMPILE_ONLY.reset(token)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """SM count of a CUDA device; a small stand-in under the CPU interpreter keeps test grids tiny."""
    if device.type != "cuda":
        return 16
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
