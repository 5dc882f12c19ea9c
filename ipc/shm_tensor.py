"""Named shared-memory segments and the numpy / torch arrays that live in them.

One process creates a segment (it owns it and is the only one to unlink it); others attach by
name, from a picklable handle. The step inputs of the workers and the broadcast ring use this.

Why not ``multiprocessing.shared_memory.SharedMemory`` directly: before Python 3.13 attaching by
name also registers the segment with the attaching process's resource tracker, which then unlinks
it (with a "leaked shared_memory" warning) when that process exits, under the owner's feet; and
``SharedMemory.close()`` raises while numpy views are alive, then again noisily from ``__del__``.
So this module does the same POSIX calls itself: the creator registers with the resource tracker
(a crash still cleans up), attachers do not, and the mapping outlives ``close()`` while views of
it exist (it is unmapped when the last view is garbage-collected).
"""

from __future__ import annotations

import _posixshmem
import logging
import math
import mmap
import os
import secrets
import weakref
from collections.abc import Sequence
from multiprocessing import resource_tracker
from typing import Any

import msgspec
import numpy as np

logger = logging.getLogger(__name__)

_NAME_PREFIX = "ps_"
_MAX_NAME = 200  # NAME_MAX is 255 on Linux; leave room for the leading slash and suffixes


def new_segment_name(tag: str = "") -> str:
    """A fresh, unguessable segment name (``ps_<tag><random>``)."""
    return f"{_NAME_PREFIX}{tag}{secrets.token_hex(8)}"


def _posix_name(name: str) -> str:
    if not name or "/" in name or len(name) > _MAX_NAME:
        raise ValueError(f"bad shared-memory name {name!r}")
    return "/" + name


def _unlink_owned(posix_name: str) -> None:
    try:
        _posixshmem.shm_unlink(posix_name)
    except FileNotFoundError:
        pass
    finally:
        resource_tracker.unregister(posix_name, "shared_memory")


class SharedSegment:
    """A mapped POSIX shared-memory segment. ``buf`` is a writable memoryview of it."""

    __slots__ = ("__weakref__", "_mmap", "_unlinker", "buf", "name", "owner", "size")

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._mmap: mmap.mmap | None = mm
        self.buf: memoryview = memoryview(mm)
        # The owner unlinks on unlink(), on garbage collection or at exit, whichever is first.
        self._unlinker = weakref.finalize(self, _unlink_owned, _posix_name(name)) if owner else None

    @classmethod
    def create(cls, size: int, name: str | None = None) -> SharedSegment:
        """Create (exclusively) a zero-filled segment of ``size`` bytes (at least 1)."""
        name = name or new_segment_name()
        pname = _posix_name(name)
        size = max(int(size), 1)
        fd = _posixshmem.shm_open(pname, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        # Register right away so that even a failure below (or a crash later) gets cleaned up.
        resource_tracker.register(pname, "shared_memory")
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            _unlink_owned(pname)
            raise
        finally:
            os.close(fd)  # the mapping keeps the memory; the fd is not needed
        return cls(name, size, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> SharedSegment:
        """Map an existing segment (FileNotFoundError if it is gone). Never unlinks it."""
        fd = _posixshmem.shm_open(_posix_name(name), os.O_RDWR, mode=0o600)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=False)

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unmap, unless views of the buffer are still alive (then the last one unmaps). Idempotent."""
        mm, self._mmap = self._mmap, None
        if mm is None:
            return
        try:
            self.buf.release()
            mm.close()
        except BufferError:
            # Arrays still view the memory; they keep the mmap object alive and the kernel
            # mapping goes away with the last of them. Nothing else to do.
            logger.debug("shared segment %s still has live views; unmapped when they are freed", self.name)

    def unlink(self) -> None:
        """Remove the name (owner only; attachers must leave that to the owner). Idempotent."""
        if self._unlinker is None:
            raise RuntimeError(
                f"segment {self.name} was attached, not created, here; only its owner unlinks it"
            )
        self._unlinker()

    def __enter__(self) -> SharedSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        return f"SharedSegment({self.name!r}, size={self.size}, owner={self.owner}, closed={self.closed})"


# ---------------------------------------------------------------------------- shared arrays


def _dtype_name(dtype: Any) -> str:
    """Canonical name shared by numpy and torch ("float32", "int64", "bfloat16", ...)."""
    if type(dtype).__module__ == "torch":
        return str(dtype).removeprefix("torch.")
    np_dtype = np.dtype(dtype)
    if np_dtype.hasobject or np_dtype.fields is not None or not np_dtype.isnative:
        raise TypeError(f"dtype {np_dtype!r} cannot live in shared memory (object, structured or non-native)")
    return np_dtype.name


def _itemsize(name: str) -> int:
    try:
        return np.dtype(name).itemsize
    except TypeError:
        import torch  # torch-only dtypes (bfloat16, float8_*)

        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"unknown dtype {name!r}") from None
        return dtype.itemsize


class SharedArrayHandle(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Everything another process needs to attach a SharedArray (picklable and wire-encodable)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


class SharedArray:
    """An array in a named shared-memory segment, viewable as numpy or as a CPU torch tensor.

    ``create`` allocates (zero-filled, owned); ``attach(handle)`` maps it in another process.
    Pickling a SharedArray (e.g. as a spawn argument) pickles its handle: the receiver attaches.
    Views returned by :meth:`numpy` / :meth:`torch` alias the shared memory.
    """

    __slots__ = ("_segment", "handle")

    def __init__(self, segment: SharedSegment, handle: SharedArrayHandle) -> None:
        self._segment = segment
        self.handle = handle

    @classmethod
    def create(cls, shape: int | Sequence[int], dtype: Any, *, name: str | None = None) -> SharedArray:
        shape_t = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if any(d < 0 for d in shape_t):
            raise ValueError(f"negative dimension in shape {shape_t}")
        handle = SharedArrayHandle(name or new_segment_name("a"), shape_t, _dtype_name(dtype))
        return cls(SharedSegment.create(handle.nbytes, handle.name), handle)

    @classmethod
    def attach(cls, handle: SharedArrayHandle) -> SharedArray:
        segment = SharedSegment.attach(handle.name)
        if segment.size < handle.nbytes:
            segment.close()
            raise ValueError(
                f"segment {handle.name} has {segment.size} bytes; the handle needs {handle.nbytes}"
            )
        return cls(segment, handle)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.handle.shape

    @property
    def dtype(self) -> str:
        return self.handle.dtype

    @property
    def nbytes(self) -> int:
        return self.handle.nbytes

    @property
    def owner(self) -> bool:
        return self._segment.owner

    def _view(self) -> memoryview:
        if self._segment.closed:
            raise ValueError(f"shared array {self.handle.name} is closed")
        return self._segment.buf[: self.nbytes]

    def numpy(self) -> np.ndarray:
        """A numpy view of the shared memory (no copy)."""
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"numpy has no dtype {self.dtype}; use .torch()") from None
        return np.frombuffer(self._view(), dtype=dtype).reshape(self.shape)

    def torch(self) -> Any:
        """A CPU torch tensor view of the shared memory (no copy; any torch dtype, incl. bfloat16)."""
        import torch

        dtype = getattr(torch, self.dtype)
        view = self._view()
        if view.nbytes == 0:
            return torch.empty(self.shape, dtype=dtype)  # torch.frombuffer refuses empty buffers
        return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(self.shape)

    def close(self) -> None:
        self._segment.close()

    def unlink(self) -> None:
        self._segment.unlink()

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __reduce__(self) -> tuple[Any, tuple[SharedArrayHandle]]:
        return (SharedArray.attach, (self.handle,))

    def __repr__(self) -> str:
        return (
            f"SharedArray({self.handle.name!r}, shape={self.shape}, dtype={self.dtype}, owner={self.owner})"
        )
