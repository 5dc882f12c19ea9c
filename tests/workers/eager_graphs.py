"""A CPU stand-in for CUDA-graph capture, so that the graph code paths run in CPU tests.

A captured CUDA graph replays the recorded kernels on the same memory: it reads its static input
buffers and rewrites its output in place. ``EagerCapture`` records the Python call instead, and a
replay runs it again on the same static buffers and copies its result into the tensor the capture
returned. What it cannot show is a capture-specific fault (a host sync or a data-dependent shape
inside a graph); the GPU checks (`make gpu-check`) cover those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")


class EagerGraph:
    def __init__(self, fn: Callable[[], torch.Tensor | None], out: torch.Tensor | None) -> None:
        self.fn = fn
        self.out = out

    def replay(self) -> None:
        result = self.fn()
        if self.out is not None:
            self.out.copy_(result)


class EagerCapture:
    def __init__(self) -> None:
        self.captured = 0

    @contextmanager
    def session(self) -> Iterator[None]:
        with torch.inference_mode():
            yield

    def capture(self, fn: Callable[[], T]) -> tuple[EagerGraph, T]:
        out = fn()
        self.captured += 1
        return EagerGraph(fn, out), out
