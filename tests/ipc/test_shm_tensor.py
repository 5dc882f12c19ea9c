"""Shared-memory segments and arrays: create / attach (also in spawned processes) / close / unlink."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ipc.shm_tensor import SharedArray, SharedArrayHandle, SharedSegment

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def _child_add_one(handle: SharedArrayHandle, arr: SharedArray) -> None:
    """Runs in a spawned process: attach by handle and through pickling, write, detach."""
    by_handle = SharedArray.attach(handle)
    by_handle.numpy()[...] += 1
    assert not by_handle.owner and not arr.owner
    arr.torch()[0, 0] = 100  # the same memory, attached through __reduce__
    by_handle.close()
    arr.close()


def test_segment_create_attach_close_unlink() -> None:
    owner = SharedSegment.create(1000)
    try:
        assert owner.owner and owner.size == 1000 and shm_exists(owner.name)
        owner.buf[:5] = b"hello"
        other = SharedSegment.attach(owner.name)
        assert bytes(other.buf[:5]) == b"hello" and not other.owner
        with pytest.raises(RuntimeError, match="only its owner"):
            other.unlink()
        other.close()
        other.close()  # idempotent
        assert shm_exists(owner.name)  # attachers never unlink
    finally:
        owner.close()
        owner.unlink()
        owner.unlink()  # idempotent
    assert not shm_exists(owner.name)
    with pytest.raises(FileNotFoundError):
        SharedSegment.attach(owner.name)


def test_segment_create_is_exclusive() -> None:
    with SharedSegment.create(10) as seg, pytest.raises(FileExistsError):
        SharedSegment.create(10, seg.name)
    assert not shm_exists(seg.name)


def test_owner_unlinks_when_garbage_collected() -> None:
    seg = SharedSegment.create(64)
    name = seg.name
    del seg
    assert not shm_exists(name)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((3, 4), np.float32), ((0, 7), np.int64), ((), np.float64), (5, np.bool_), ((2, 3), "int16")],
)
def test_numpy_array_shared_between_attachments(shape: tuple[int, ...], dtype: object) -> None:
    with SharedArray.create(shape, dtype) as owner:
        view = owner.numpy()
        assert view.shape == (shape if isinstance(shape, tuple) else (shape,))
        assert not view.any()  # zero-filled
        other = SharedArray.attach(owner.handle)
        other.numpy()[...] = 1
        assert (view == 1).all()
        assert torch.equal(owner.torch(), torch.from_numpy(view))
        other.close()
    assert not shm_exists(owner.handle.name)


def test_torch_only_dtype() -> None:
    with SharedArray.create((4, 8), torch.bfloat16) as owner:
        assert owner.dtype == "bfloat16" and owner.nbytes == 64
        t = owner.torch()
        t.fill_(1.5)
        attached = SharedArray.attach(owner.handle)
        assert attached.torch().dtype == torch.bfloat16 and (attached.torch() == 1.5).all()
        with pytest.raises(TypeError, match=r"use \.torch"):
            attached.numpy()
        attached.close()


def test_spawned_process_sees_and_writes_the_same_memory() -> None:
    with SharedArray.create((2, 3), np.int32) as owner:
        owner.numpy()[...] = np.arange(6).reshape(2, 3)
        proc = mp.get_context("spawn").Process(target=_child_add_one, args=(owner.handle, owner))
        proc.start()
        proc.join(30)
        assert proc.exitcode == 0
        assert owner.numpy().tolist() == [[100, 2, 3], [4, 5, 6]]
    assert not shm_exists(owner.handle.name)


def test_handle_pickles_and_close_tolerates_live_views() -> None:
    owner = SharedArray.create(10, np.float32)
    handle = pickle.loads(pickle.dumps(owner.handle))
    assert handle == owner.handle
    attached = pickle.loads(pickle.dumps(owner))  # pickling attaches on the other side
    view = attached.numpy()
    attached.close()  # a live view keeps the mapping; close must not raise
    view[0] = 3.0
    assert owner.numpy()[0] == 3.0
    with pytest.raises(ValueError, match="closed"):
        attached.numpy()
    owner.close()
    owner.unlink()
    assert not shm_exists(owner.handle.name)


def test_bad_inputs() -> None:
    with pytest.raises(TypeError):
        SharedArray.create(3, object)
    with pytest.raises(ValueError):
        SharedArray.create((-1,), np.float32)
    with SharedArray.create(4, np.float32) as owner:
        too_big = SharedArrayHandle(owner.handle.name, (100,), "float32")
        with pytest.raises(ValueError, match="needs"):
            SharedArray.attach(too_big)
    with pytest.raises(ValueError, match="bad shared-memory name"):
        SharedSegment.attach("a/b")


def test_no_resource_tracker_complaints_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Owner in one process, attacher in a spawned child: no leak warnings, nothing left behind."""
    script = textwrap.dedent(
        """
        import multiprocessing as mp, os, numpy as np
        from ipc.shm_tensor import SharedArray

        def child(handle):
            a = SharedArray.attach(handle)
            a.numpy()[:] = 7
            a.close()

        if __name__ == "__main__":
            owner = SharedArray.create(100, np.int64)
            p = mp.get_context("spawn").Process(target=child, args=(owner.handle,))
            p.start(); p.join(30)
            assert p.exitcode == 0 and (owner.numpy() == 7).all()
            owner.close(); owner.unlink()
            assert not os.path.exists("/dev/shm/" + owner.handle.name)
            print("ok")
        """
    )
    path = tmp_path / "shm_tensor_leak_check.py"  # a file, so spawn can re-import `child`
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "leaked" not in result.stderr and "resource_tracker" not in result.stderr, result.stderr
