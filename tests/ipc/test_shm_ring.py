"""The shared-memory broadcast ring: ordering, overflow, waits, wake-ups, shutdown, cleanup."""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ipc.shm_ring as shm_ring
from ipc.messages import CachedRequestData, NewRequestData, SchedulerOutput
from ipc.sampling_params import SamplingParams
from ipc.serialization import Decoder
from ipc.shm_ring import RingClosed, RingHandle, ShmRingReader, ShmRingWriter

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPIN_S = 0.002  # the CI box has two shared cores: spin little
SLOT_BYTES = 4096


def leftovers(handle: RingHandle) -> list[str]:
    """Shared-memory segments and the wake-up FIFO directory of this ring still on disk."""
    return glob.glob(f"/dev/shm/{handle.name}*") + (
        [handle.wake_dir] if os.path.exists(handle.wake_dir) else []
    )


@pytest.fixture
def ring() -> Iterator[tuple[ShmRingWriter, list[ShmRingReader]]]:
    writer = ShmRingWriter(2, n_slots=4, slot_bytes=SLOT_BYTES, spin_s=SPIN_S)
    readers = [writer.handle.reader(r, spin_s=SPIN_S) for r in range(2)]
    writer.wait_for_readers(10)
    yield writer, readers
    for reader in readers:
        reader.close()
    writer.close()
    assert not leftovers(writer.handle)


def payload(i: int) -> list[bytes]:
    """Message i: deterministic frames of varied sizes; every 37th needs the overflow path."""
    size = 3 * SLOT_BYTES + i if i % 37 == 5 else (i * 7) % 700
    body = bytes([i % 251]) * size
    return [i.to_bytes(8, "little"), body, zlib.crc32(body).to_bytes(4, "little")]


def check(i: int, frames: list[memoryview]) -> None:
    assert int.from_bytes(frames[0], "little") == i
    assert zlib.crc32(frames[1]) == int.from_bytes(frames[2], "little")
    assert [bytes(f) for f in frames] == payload(i)


# ------------------------------------------------------------------------------ in-process


def test_broadcast_in_order_with_wraparound_and_overflow(
    ring: tuple[ShmRingWriter, list[ShmRingReader]],
) -> None:
    writer, readers = ring
    for i in range(200):
        writer.enqueue_frames(payload(i), timeout=5)
        if i % 3 == 2:  # let the writer run ahead a little, never more than the ring
            for j in range(i - 2, i + 1):
                for reader in readers:
                    check(j, reader.dequeue_frames(timeout=5))


def test_frame_shapes(ring: tuple[ShmRingWriter, list[ShmRingReader]]) -> None:
    writer, readers = ring
    cases: list[list[Any]] = [
        [],
        [b""],
        [b"", b"x", b""],
        [np.arange(10, dtype=np.float64)],
        [bytearray(b"ab")] * 50,
    ]
    for frames in cases:
        writer.enqueue_frames(frames, timeout=5)
        for reader in readers:
            got = reader.dequeue_frames(timeout=5)
            assert [bytes(f) for f in got] == [bytes(memoryview(f).cast("B")) for f in frames]


def test_overflow_segments_are_reused_then_replaced(ring: tuple[ShmRingWriter, list[ShmRingReader]]) -> None:
    writer, readers = ring
    sizes = [5 * SLOT_BYTES, 6 * SLOT_BYTES, 3 << 20, 10, 2 << 20]
    for lap in range(2):
        for k, size in enumerate(sizes):
            body = bytes([k + lap]) * size
            writer.enqueue_frames([body], timeout=5)
            for reader in readers:
                (got,) = reader.dequeue_frames(timeout=5)
                assert got.nbytes == size and got[0] == k + lap and got[-1] == k + lap
    # One overflow segment per slot at most (4 slots), none leaked by replacement.
    assert len(glob.glob(f"/dev/shm/{writer.handle.name}_o*")) <= 4


def test_messages_with_arrays(ring: tuple[ShmRingWriter, list[ShmRingReader]]) -> None:
    writer, readers = ring
    msg = SchedulerOutput(
        scheduled_new_reqs=[
            NewRequestData(
                req_id="r",
                prompt_token_ids=list(range(3000)),
                sampling_params=SamplingParams(),
                block_ids=[1],
                num_computed_tokens=0,
            )
        ],
        scheduled_cached_reqs=CachedRequestData(req_ids=["q"], new_block_ids=[[4]], num_computed_tokens=[9]),
        num_scheduled_tokens={"r": 3000, "q": 1},
        total_num_scheduled_tokens=3001,
    )
    decoder = Decoder(SchedulerOutput)
    writer.enqueue(msg, timeout=5)
    writer.enqueue({"positions": np.arange(5000, dtype=np.int64)}, timeout=5)
    for reader in readers:
        assert decoder.decode(reader.dequeue_frames(timeout=5)) == msg
        got = reader.dequeue(timeout=5)["positions"]
        assert np.array_equal(got, np.arange(5000)) and got.flags.writeable
        assert got.ctypes.data % 16 == 0  # frames are 16-byte aligned in the private copy


def test_reader_timeout_and_writer_timeout_when_full(ring: tuple[ShmRingWriter, list[ShmRingReader]]) -> None:
    writer, readers = ring
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        readers[0].dequeue_frames(timeout=0.2)
    assert 0.15 < time.monotonic() - start < 5
    for i in range(4):  # fill all slots; reader 0 keeps up, reader 1 never reads
        writer.enqueue_frames([b"%d" % i], timeout=5)
        readers[0].dequeue_frames(timeout=5)
    with pytest.raises(TimeoutError, match=r"readers \[1\]"):
        writer.enqueue_frames([b"blocked"], timeout=0.2)
    with pytest.raises(TimeoutError):
        writer.wait_drained(timeout=0.1)
    for i in range(4):
        assert bytes(readers[1].dequeue_frames(timeout=5)[0]) == b"%d" % i
    writer.wait_drained(timeout=5)
    writer.enqueue_frames([b"unblocked"], timeout=5)


def test_blocked_reader_wakes_by_notification(
    monkeypatch: pytest.MonkeyPatch, ring: tuple[ShmRingWriter, list[ShmRingReader]]
) -> None:
    """After idling past its spin window the reader sleeps; the writer's notification wakes it.
    The poll slice is made long so that only the notification can explain a fast wake-up."""
    monkeypatch.setattr(shm_ring, "_POLL_SLICE_S", 30.0)
    writer, readers = ring
    got: list[float] = []

    def wait() -> None:
        readers[0].dequeue_frames(timeout=20)
        got.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)  # far past SPIN_S: the reader is blocked in poll
    assert readers[0]._mv[writer._layout.idle_off + 0] == 1
    sent = time.monotonic()
    writer.enqueue_frames([b"wake"], timeout=5)
    thread.join(10)
    assert got and got[0] - sent < 2.0
    readers[1].dequeue_frames(timeout=5)


def test_cancel_wakes_a_blocked_reader(
    monkeypatch: pytest.MonkeyPatch, ring: tuple[ShmRingWriter, list[ShmRingReader]]
) -> None:
    monkeypatch.setattr(shm_ring, "_POLL_SLICE_S", 30.0)
    _, readers = ring
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            readers[0].dequeue_frames()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    readers[0].cancel()
    thread.join(10)
    assert time.monotonic() - start < 2.0
    assert len(errors) == 1 and isinstance(errors[0], RingClosed)
    with pytest.raises(RingClosed):
        readers[0].dequeue_frames(timeout=1)


def test_writer_close_drains_then_wakes_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm_ring, "_POLL_SLICE_S", 30.0)
    writer = ShmRingWriter(2, n_slots=4, slot_bytes=SLOT_BYTES, spin_s=SPIN_S)
    readers = [writer.handle.reader(r, spin_s=SPIN_S) for r in range(2)]
    writer.wait_for_readers(10)
    results: list[Any] = []

    def drain(reader: ShmRingReader) -> None:
        count = 0
        try:
            while True:
                reader.dequeue_frames(timeout=20)
                count += 1
        except RingClosed:
            results.append(count)
        except BaseException as e:
            results.append(e)

    writer.enqueue_frames([b"a"])
    writer.enqueue_frames([b"b" * 3 * SLOT_BYTES])  # overflow: needs the drain before unlinking
    threads = [threading.Thread(target=drain, args=(r,)) for r in readers]
    for t in threads:
        t.start()
    time.sleep(0.2)  # readers consume both, then block
    start = time.monotonic()
    writer.close(drain_timeout=5)
    for t in threads:
        t.join(10)
    assert time.monotonic() - start < 5
    assert results == [2, 2]
    with pytest.raises(RingClosed):
        writer.enqueue_frames([b"late"])
    for r in readers:
        r.close()
    assert not leftovers(writer.handle)


def test_handle_is_picklable_and_checked() -> None:
    with ShmRingWriter(1, n_slots=2, slot_bytes=256) as writer:
        handle = pickle.loads(pickle.dumps(writer.handle))
        assert handle == writer.handle
        with pytest.raises(ValueError, match="rank"):
            ShmRingReader(handle, 1)
        wrong = RingHandle(
            handle.name, 3, handle.n_slots, handle.slot_bytes, handle.wake_dir, handle.writer_pid
        )
        with pytest.raises(ValueError, match="not the ring"):
            ShmRingReader(wrong, 0)
    assert not leftovers(writer.handle)


# ----------------------------------------------------------------------- across processes


def _reader_main(handle: RingHandle, rank: int, n_messages: int, results: Any) -> None:
    """Spawned reader: checks every message in order, then expects RingClosed."""
    reader = ShmRingReader(handle, rank, spin_s=SPIN_S)
    seen = 0
    try:
        while True:
            frames = reader.dequeue_frames(timeout=30)
            check(seen, frames)
            seen += 1
    except RingClosed:
        results.put((rank, seen, None))
    except BaseException as e:
        results.put((rank, seen, repr(e)))
    finally:
        reader.close()


def test_one_writer_two_spawned_readers() -> None:
    n_messages = 3000
    ctx = mp.get_context("spawn")
    writer = ShmRingWriter(2, n_slots=8, slot_bytes=SLOT_BYTES, spin_s=SPIN_S)
    results = ctx.Queue()
    procs = [ctx.Process(target=_reader_main, args=(writer.handle, r, n_messages, results)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        writer.wait_for_readers(30)
        for i in range(n_messages - 10):
            writer.enqueue_frames(payload(i), timeout=30)
        time.sleep(0.3)  # readers go idle and block; the next messages must wake them
        for i in range(n_messages - 10, n_messages):
            writer.enqueue_frames(payload(i), timeout=30)
        writer.close(drain_timeout=30)
        outcomes = sorted(results.get(timeout=30) for _ in procs)
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        writer.close()
    assert outcomes == [(0, n_messages, None), (1, n_messages, None)]
    assert [p.exitcode for p in procs] == [0, 0]
    assert not leftovers(writer.handle)


def _writer_main(handles: Any, go: Any) -> None:
    writer = ShmRingWriter(1, n_slots=2, slot_bytes=256, spin_s=SPIN_S)
    handles.put(writer.handle)
    writer.wait_for_readers(30)
    writer.enqueue_frames([b"first"])
    go.wait(30)
    os.kill(os.getpid(), signal.SIGKILL)  # die without closing anything


def test_reader_notices_writer_death(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel closes a dead writer's FIFO ends: the blocked reader sees POLLHUP at once
    (the poll slice is made long so the pid check cannot be what notices)."""
    import _posixshmem
    from multiprocessing import resource_tracker

    ctx = mp.get_context("spawn")
    handles, go = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_writer_main, args=(handles, go))
    proc.start()
    handle = handles.get(timeout=30)
    monkeypatch.setattr(shm_ring, "_POLL_SLICE_S", 30.0)
    reader = ShmRingReader(handle, 0, spin_s=SPIN_S)
    try:
        assert bytes(reader.dequeue_frames(timeout=10)[0]) == b"first"
        go.set()
        proc.join(30)
        start = time.monotonic()
        with pytest.raises(RingClosed, match="has exited"):
            reader.dequeue_frames(timeout=20)
        assert time.monotonic() - start < 5
    finally:
        reader.close()
        # The killed writer could not clean up. Its spawn child shares our resource tracker,
        # so unlink and unregister here, as its close() would have.
        for path in glob.glob(f"/dev/shm/{handle.name}*"):
            name = "/" + os.path.basename(path)
            _posixshmem.shm_unlink(name)
            resource_tracker.unregister(name, "shared_memory")
        shutil.rmtree(handle.wake_dir, ignore_errors=True)
    assert not leftovers(handle)


def test_clean_exit_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Writer + spawned readers + overflow in a fresh interpreter: no resource-tracker warnings."""
    script = textwrap.dedent(
        """
        import multiprocessing as mp, os, glob
        from ipc.shm_ring import ShmRingWriter, ShmRingReader, RingClosed

        def reader(handle, rank):
            r = ShmRingReader(handle, rank, spin_s=0.001)
            n = 0
            try:
                while True:
                    r.dequeue_frames(timeout=30); n += 1
            except RingClosed:
                pass
            r.close()
            assert n == 50, n

        if __name__ == "__main__":
            w = ShmRingWriter(2, n_slots=2, slot_bytes=1024, spin_s=0.001)
            ps = [mp.get_context("spawn").Process(target=reader, args=(w.handle, r)) for r in range(2)]
            for p in ps: p.start()
            w.wait_for_readers(30)
            for i in range(50):
                w.enqueue_frames([b"x" * (5000 if i % 5 == 0 else 10)], timeout=30)
            w.close(drain_timeout=30)
            for p in ps: p.join(30)
            assert [p.exitcode for p in ps] == [0, 0]
            assert not glob.glob("/dev/shm/" + w.handle.name + "*")
            print("ok")
        """
    )
    path = tmp_path / "ring_leak_check.py"
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


def _idle_reader_main(handle: RingHandle, ready: Any) -> None:
    reader = ShmRingReader(handle, 1, spin_s=SPIN_S)
    ready.set()
    reader.dequeue_frames(timeout=60)  # blocks (idle) until killed


def test_writer_survives_a_reader_killed_while_idle() -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    with ShmRingWriter(2, n_slots=2, slot_bytes=256, spin_s=SPIN_S) as writer:
        reader0 = writer.handle.reader(0, spin_s=SPIN_S)
        proc = ctx.Process(target=_idle_reader_main, args=(writer.handle, ready))
        proc.start()
        try:
            assert ready.wait(30)
            writer.wait_for_readers(30)
            deadline = time.monotonic() + 30
            while writer._mv[writer._layout.idle_off + 1] != 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the child is blocked with its idle byte set
            proc.kill()
            proc.join(30)
            # Its idle byte is stuck at 1: the wake-up write hits a closed pipe and is dropped.
            writer.enqueue_frames([b"after"], timeout=5)
            assert bytes(reader0.dequeue_frames(timeout=5)[0]) == b"after"
            writer.enqueue_frames([b"again"], timeout=5)
            with pytest.raises(TimeoutError, match=r"readers \[1\]"):
                writer.enqueue_frames([b"full"], timeout=0.2)
        finally:
            reader0.close()
            if proc.is_alive():
                proc.kill()
    assert not leftovers(writer.handle)
