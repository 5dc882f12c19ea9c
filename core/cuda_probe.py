"""Is there a usable CUDA device? Answered without importing torch.

The frontend decides the engine's device before it starts the engine process; importing torch
there only to call ``torch.cuda.is_available()`` put a cold torch import (5 s on a fresh machine)
in front of the engine's own. The driver answers the same question: ``cuInit`` and
``cuDeviceGetCount`` of libcuda (which honour CUDA_VISIBLE_DEVICES), plus a check that the
installed torch is a CUDA build at all.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def torch_has_cuda() -> bool:
    """Whether the installed torch ships its CUDA library (a CPU wheel does not)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return any(lib.glob("libtorch_cuda*.so*"))


def cuda_device_count() -> int:
    """CUDA devices the driver reports to this process; 0 without a driver or on an error."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    if libcuda.cuInit(0) != 0:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_available() -> bool:
    return torch_has_cuda() and cuda_device_count() > 0
