"""A shared-memory broadcast ring: one writer, N readers, every reader sees every message in order.

The engine core broadcasts each SchedulerOutput to all worker ranks through it.

Segment layout (one POSIX shm segment; every region starts on a 64-byte cache line)::

    control    64 B        magic "PSRING01", n_readers u32, n_slots u32, slot_bytes u64, closed u8
    idle       n_readers   idle[r] = 1 while reader r is blocked (asleep) rather than spinning
    flags      n_slots x align64(1 + n_readers)
                           [written, ack_0, ..., ack_{n-1}]: a slot per cache line
    data       n_slots x slot_bytes
                           header (kind u8, n_frames u32, body_bytes u64, seq u64), then for
                           kind=INLINE the body, for kind=OVERFLOW the name of the segment
                           holding the body

A body is ``n_frames`` u64 lengths followed by the frames, each at a 16-byte aligned offset, so
arrays decoded from them are aligned.

Protocol (the reader's ack byte is its only ack; there is no other channel back):

* A slot is free when ``written == 0`` or every ack byte is 1.
* Writer: ``written = 0``; write header + body; all acks = 0; fence; ``written = 1``; fence. The
  payload is complete before any reader can see ``written == 1 && ack == 0``, and readers skip the
  slot while it is being written because their acks are still 1 from the previous lap.
* Reader r at its cursor: waits for ``written == 1 && ack_r == 0``, copies the body out, fence,
  ``ack_r = 1``, advances. Copying makes the decoded message independent of the slot, which the
  writer may reuse as soon as every reader has acked.
* Messages larger than a slot go through an overflow segment (one per slot, reused while it is
  big enough, unlinked by the writer when replaced or at close); the slot carries its name. No
  slow-joiner or side-channel ordering problems: the overflow body is published by the same flags.

Waiting: readers spin (``os.sched_yield``) for ``spin_s`` after entering ``dequeue``, which is the
loaded case (microsecond latency). Then they set their idle byte, re-check, and block in
``poll()`` on their own named pipe (FIFO ``wake-<rank>`` in the writer's private 0700 directory).
After an enqueue the writer writes one byte into the FIFO of each reader whose idle byte is set,
so a busy ring costs no syscalls and an idle reader wakes in one pipe hop. (Not a ZeroMQ PUB/SUB
notification: it adds two I/O-thread hops, several times the pipe's latency (benchmarks/
ring_bench.py), and an I/O thread per reader.) Each side stores its own flag, fences,
then loads the other's, so a wakeup cannot be missed; a bounded poll slice re-checks anyway.

Shutdown never hangs: the writer's :meth:`~ShmRingWriter.close` sets the ``closed`` byte, wakes
every reader and closes its FIFO ends; readers drain what was written, then raise
:class:`RingClosed`. If the writer dies instead, the kernel closes its FIFO ends and readers see
POLLHUP at once (a pid check every poll slice covers a writer that died before opening them).
:meth:`ShmRingReader.cancel` wakes a blocked reader from another thread through a self-pipe.
Every wait takes a timeout.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from ipc.serialization import Decoder, Encoder
from ipc.shm_tensor import SharedSegment, new_segment_name
from ipc.zmq_utils import IpcDir

logger = logging.getLogger(__name__)

RING_MAGIC = b"PSRING01"
_CTRL = struct.Struct("<8sIIQ")  # magic, n_readers, n_slots, slot_bytes
_CLOSED_OFF = _CTRL.size
_CTRL_BYTES = 64
_SLOT_HDR = struct.Struct("<BxxxIQQ")  # kind, n_frames, body_bytes, seq
_NAME_FIELD = 64  # u8 length + overflow segment name
_FRAME_ALIGN = 16
KIND_INLINE = 0
KIND_OVERFLOW = 1

DEFAULT_N_SLOTS = 8
DEFAULT_SLOT_BYTES = 1 << 20
DEFAULT_SPIN_S = 0.05
_POLL_SLICE_S = 0.1  # how often a blocked reader re-checks flags and writer liveness
_MIN_OVERFLOW_BYTES = 1 << 20


class RingClosed(EOFError):
    """The ring was closed (by the writer, or cancelled locally): no more messages will come."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _body_layout(lengths: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of each frame in a body and the body size."""
    # Inlined rounding (this runs twice per message): _FRAME_ALIGN is a power of two.
    mask = _FRAME_ALIGN - 1
    off = (8 * len(lengths) + mask) & ~mask
    offsets = []
    for n in lengths:
        offsets.append(off)
        off = (off + n + mask) & ~mask
    return offsets, off


def _byte_view(frame: Any) -> memoryview:
    view = memoryview(frame)
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        return memoryview(view.tobytes())
    return view.cast("B")


class _Layout:
    """Offsets into the ring segment; computed identically by the writer and every reader."""

    __slots__ = (
        "data_off",
        "flag_offs",
        "flag_stride",
        "flags_off",
        "idle_off",
        "n_readers",
        "n_slots",
        "size",
        "slot_bytes",
        "slot_offs",
    )

    def __init__(self, n_readers: int, n_slots: int, slot_bytes: int) -> None:
        self.n_readers = n_readers
        self.n_slots = n_slots
        self.slot_bytes = slot_bytes
        self.idle_off = _CTRL_BYTES
        self.flags_off = self.idle_off + _align(n_readers, 64)
        self.flag_stride = _align(1 + n_readers, 64)  # one slot's flags per cache line
        self.data_off = self.flags_off + n_slots * self.flag_stride
        self.size = self.data_off + n_slots * slot_bytes
        # Per-slot offsets, precomputed: the hot paths index these instead of multiplying.
        self.flag_offs = tuple(self.flags_off + i * self.flag_stride for i in range(n_slots))
        self.slot_offs = tuple(self.data_off + i * slot_bytes for i in range(n_slots))


class RingHandle(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What a reader needs to attach, in any process (picklable and wire-encodable)."""

    name: str
    n_readers: int
    n_slots: int
    slot_bytes: int
    wake_dir: str  # private directory holding the readers' wake-up FIFOs
    writer_pid: int

    def wake_path(self, rank: int) -> str:
        return os.path.join(self.wake_dir, f"wake-{rank}")

    def reader(self, rank: int, **kwargs: Any) -> ShmRingReader:
        return ShmRingReader(self, rank, **kwargs)


class _Fence:
    """A full memory barrier: acquiring and releasing a lock is an atomic read-modify-write.

    On x86 (TSO) this matters for the store-then-load pairs of the idle/wake-up handshake; on weaker
    memory models (ARM) it also orders the payload stores before the written flag.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self) -> None:
        self._lock.acquire()
        self._lock.release()


class ShmRingWriter:
    """The single writer. Create it in the broadcasting process, pass :attr:`handle` to readers,
    call :meth:`wait_for_readers` before the first enqueue, :meth:`close` at the end."""

    def __init__(
        self,
        n_readers: int,
        *,
        n_slots: int = DEFAULT_N_SLOTS,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        encoder: Encoder | None = None,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> None:
        if n_readers < 1 or n_slots < 1:
            raise ValueError(f"need at least one reader and one slot, got {n_readers} / {n_slots}")
        slot_bytes = _align(max(slot_bytes, _SLOT_HDR.size + _NAME_FIELD + 64), 64)
        self._layout = _Layout(n_readers, n_slots, slot_bytes)
        self._encoder = encoder or Encoder()
        self._spin_s = spin_s
        self._fence = _Fence()
        self._next = 0
        self._seq = 0
        self._cancelled = False
        self._closed = False
        self._overflow: list[SharedSegment | None] = [None] * n_slots
        self._overflow_gen = 0
        self._ones = b"\x01" * n_readers
        self._zeros = b"\x00" * n_readers

        self._segment = SharedSegment.create(self._layout.size, new_segment_name("r"))
        self._mv = self._segment.buf
        _CTRL.pack_into(self._mv, 0, RING_MAGIC, n_readers, n_slots, slot_bytes)

        self._ipc_dir = IpcDir(prefix="pagedserve-ring-")
        self.handle = RingHandle(
            self._segment.name, n_readers, n_slots, slot_bytes, self._ipc_dir.path, os.getpid()
        )
        for rank in range(n_readers):
            os.mkfifo(self.handle.wake_path(rank), 0o600)
        # Write ends, opened once the reader has opened its read end (ENXIO before that).
        self._wake_fds: list[int | None] = [None] * n_readers
        logger.debug(
            "ring %s: %d readers, %d slots of %d B", self.handle.name, n_readers, n_slots, slot_bytes
        )

    # ------------------------------------------------------------------ setup and teardown

    def wait_for_readers(self, timeout: float | None = None) -> None:
        """Block until every reader has attached (opened its wake-up FIFO); TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            missing = [r for r in range(self._layout.n_readers) if self._wake_fd(r) is None]
            if not missing:
                return
            if self._cancelled:
                raise RingClosed("ring writer was cancelled")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"ring readers {missing} did not attach within {timeout} s")
            time.sleep(1e-3)

    def _wake_fd(self, rank: int) -> int | None:
        fd = self._wake_fds[rank]
        if fd is None:
            try:
                fd = os.open(self.handle.wake_path(rank), os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no reader has the FIFO open yet
                    raise
                return None
            self._wake_fds[rank] = fd
        return fd

    def _wake(self, rank: int) -> None:
        fd = self._wake_fd(rank)
        if fd is None:
            return
        try:
            os.write(fd, b"\x00")
        except BlockingIOError:
            pass  # the pipe is full of unread wake-ups: the reader will wake anyway
        except BrokenPipeError:
            # The reader is gone (it died while idle): drop our end; nothing is left to wake.
            os.close(fd)
            self._wake_fds[rank] = None

    def wait_drained(self, timeout: float | None = None) -> None:
        """Block until every reader has read every message (TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for slot in range(self._layout.n_slots):
            self._wait_free(slot, deadline, timeout)

    def cancel(self) -> None:
        """Make a blocked (and every later) enqueue raise RingClosed. Thread-safe."""
        self._cancelled = True

    def close(self, drain_timeout: float = 0.0) -> None:
        """Mark the ring closed and wake the readers, which drain what was written (overflow
        messages only if they do so within ``drain_timeout``), then free everything. Idempotent."""
        if self._closed:
            return
        if drain_timeout > 0:
            try:
                self.wait_drained(drain_timeout)
            except (TimeoutError, RingClosed):
                logger.warning("ring %s closed with unread messages", self.handle.name)
        self._closed = True
        self._mv[_CLOSED_OFF] = 1
        self._fence()  # readers that see our FIFO end close (POLLHUP) must also see `closed`
        for fd in self._wake_fds:
            if fd is not None:
                with contextlib.suppress(OSError):  # full pipe or departed reader: nothing to wake
                    os.write(fd, b"\x00")
                os.close(fd)
        self._wake_fds = [None] * self._layout.n_readers
        for seg in self._overflow:
            if seg is not None:
                seg.close()
                seg.unlink()
        self._overflow = [None] * self._layout.n_slots
        self._mv = memoryview(b"")
        self._segment.close()
        self._segment.unlink()
        self._ipc_dir.close()

    def __enter__(self) -> ShmRingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ writing

    def enqueue(self, msg: Any, timeout: float | None = None) -> None:
        """Encode ``msg`` (ipc.serialization) and broadcast it."""
        self.enqueue_frames(self._encoder.encode(msg), timeout)

    def enqueue_frames(self, frames: Sequence[Any], timeout: float | None = None) -> None:
        """Broadcast a list of byte buffers. Blocks while the next slot is unread by some reader;
        TimeoutError after ``timeout`` seconds, RingClosed if cancelled or closed."""
        if self._closed:
            raise RingClosed("ring writer is closed")
        views = [_byte_view(f) for f in frames]
        lengths = [v.nbytes for v in views]
        offsets, body_bytes = _body_layout(lengths)
        layout = self._layout
        slot = self._next
        self._wait_free(slot, None if timeout is None else time.monotonic() + timeout, timeout)

        mv = self._mv
        flag = layout.flag_offs[slot]
        base = layout.slot_offs[slot]
        # Not needed for correctness (every ack is 1, so no reader touches the slot until the
        # acks are reset below), but it keeps the slot state honest ("0???" = being written).
        mv[flag] = 0
        inline_room = layout.slot_bytes - _SLOT_HDR.size
        if body_bytes <= inline_room:
            kind, dst, body_off = KIND_INLINE, mv, base + _SLOT_HDR.size
        else:
            segment = self._overflow_segment(slot, body_bytes)
            name = segment.name.encode()
            mv[base + _SLOT_HDR.size] = len(name)
            start = base + _SLOT_HDR.size + 1
            mv[start : start + len(name)] = name
            kind, dst, body_off = KIND_OVERFLOW, segment.buf, 0
        struct.pack_into(f"<{len(lengths)}Q", dst, body_off, *lengths)
        for view, off, n in zip(views, offsets, lengths):
            dst[body_off + off : body_off + off + n] = view
        _SLOT_HDR.pack_into(mv, base, kind, len(lengths), body_bytes, self._seq)
        mv[flag + 1 : flag + 1 + layout.n_readers] = self._zeros
        self._fence()
        mv[flag] = 1
        self._fence()  # publish before reading the idle flags (pairs with the reader's fence)
        self._next = (slot + 1) % layout.n_slots
        self._seq += 1
        idle = mv[layout.idle_off : layout.idle_off + layout.n_readers]
        if idle != self._zeros:
            for rank, asleep in enumerate(idle):
                if asleep:
                    self._wake(rank)

    def _slot_free(self, slot: int) -> bool:
        flag = self._layout.flag_offs[slot]
        mv = self._mv
        return mv[flag] == 0 or mv[flag + 1 : flag + 1 + self._layout.n_readers] == self._ones

    def _wait_free(self, slot: int, deadline: float | None, timeout: float | None) -> None:
        if self._slot_free(slot):
            return
        spin_until = time.monotonic() + self._spin_s
        sleep_s = 50e-6
        while not self._slot_free(slot):
            if self._cancelled:
                raise RingClosed("ring writer was cancelled")
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                flag = self._layout.flag_offs[slot]
                laggards = [r for r in range(self._layout.n_readers) if self._mv[flag + 1 + r] == 0]
                raise TimeoutError(f"ring slot {slot} still unread by readers {laggards} after {timeout} s")
            if now < spin_until:
                os.sched_yield()
            else:
                # Readers are busy (the ring is full): back off rather than burn a core.
                time.sleep(sleep_s)
                sleep_s = min(sleep_s * 2, 1e-3)

    def _overflow_segment(self, slot: int, need: int) -> SharedSegment:
        segment = self._overflow[slot]
        # Safe to replace: the slot is free, so every reader is done with its previous segment.
        if segment is not None and (segment.size < need or segment.size > max(4 * need, 64 << 20)):
            segment.close()
            segment.unlink()
            segment = None
        if segment is None:
            size = max(_MIN_OVERFLOW_BYTES, 1 << (need - 1).bit_length())
            self._overflow_gen += 1
            segment = SharedSegment.create(size, f"{self.handle.name}_o{slot}_{self._overflow_gen}")
            self._overflow[slot] = segment
        return segment


class ShmRingReader:
    """Reader ``rank`` (0..n_readers-1) of a ring; create it from a RingHandle in any process."""

    def __init__(
        self,
        handle: RingHandle,
        rank: int,
        *,
        decoder: Decoder[Any] | None = None,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> None:
        if not 0 <= rank < handle.n_readers:
            raise ValueError(f"reader rank {rank} out of range for {handle.n_readers} readers")
        self.handle = handle
        self.rank = rank
        self._layout = _Layout(handle.n_readers, handle.n_slots, handle.slot_bytes)
        self._decoder = decoder or Decoder()
        self._spin_s = spin_s
        self._fence = _Fence()
        self._next = 0
        self._seq = 0
        self._cancelled = False
        self._closed = False
        self._overflow: dict[int, SharedSegment] = {}

        self._segment = SharedSegment.attach(handle.name)
        self._mv = self._segment.buf
        try:
            geometry = _CTRL.unpack_from(self._mv, 0)
            if geometry != (RING_MAGIC, handle.n_readers, handle.n_slots, handle.slot_bytes):
                raise ValueError(f"segment {handle.name} is not the ring its handle describes: {geometry}")
        except BaseException:
            self._mv = memoryview(b"")
            self._segment.close()
            raise
        self._idle = self._layout.idle_off + rank
        self._ack_offs = tuple(off + 1 + rank for off in self._layout.flag_offs)
        try:
            # Non-blocking open of a FIFO's read end succeeds without a writer.
            self._fifo = os.open(handle.wake_path(rank), os.O_RDONLY | os.O_NONBLOCK)
        except BaseException:
            self._mv = memoryview(b"")
            self._segment.close()
            raise
        self._writer_hung_up = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # cancel() may race close() from another thread; the lock keeps it from writing to a
        # closed (and possibly reused) fd number.
        self._wake_lock = threading.Lock()
        self._poller = select.poll()
        self._poller.register(self._fifo, select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)

    # ---------------------------------------------------------------------------- reading

    def dequeue(self, timeout: float | None = None) -> Any:
        """The next message, decoded with this reader's Decoder."""
        return self._decoder.decode(self.dequeue_frames(timeout))

    def dequeue_frames(self, timeout: float | None = None) -> list[memoryview]:
        """The next message's frames (private copies). TimeoutError after ``timeout`` seconds;
        RingClosed once the writer closed (after all its messages were read), was cancelled, or
        the writer process died."""
        frames = self._try_read()
        if frames is not None:
            return frames
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_until = time.monotonic() + self._spin_s
        while True:
            frames = self._try_read()
            if frames is not None:
                return frames
            self._check_open()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"no ring message within {timeout} s")
            if now < spin_until:
                os.sched_yield()
                continue
            self._block(deadline)

    def poll(self) -> bool:
        """Whether a message is waiting (never blocks; no system call)."""
        return not self._closed and self._readable()

    def _block(self, deadline: float | None) -> None:
        """Sleep until a notification, a cancel, or the end of a poll slice."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fifo, 4096):  # drop stale wake-ups; b"" means no writer end
                pass
        mv = self._mv
        mv[self._idle] = 1
        self._fence()  # publish idle before re-checking (pairs with the writer's fence)
        try:
            if self._readable() or mv[_CLOSED_OFF] or self._cancelled:
                return
            slice_s = _POLL_SLICE_S
            if deadline is not None:
                slice_s = max(0.0, min(slice_s, deadline - time.monotonic()))
            events = self._poller.poll(math.ceil(slice_s * 1000))
            if not events and not self._writer_alive():
                raise RingClosed(f"ring writer process {self.handle.writer_pid} has exited")
            for fd, event in events:
                if fd == self._fifo and event & select.POLLHUP:
                    # Every write end is closed: the writer closed the ring or died. Stop polling
                    # the FIFO (POLLHUP would fire forever); _check_open tells the two apart.
                    self._poller.unregister(self._fifo)
                    self._writer_hung_up = True
        finally:
            mv[self._idle] = 0

    def _check_open(self) -> None:
        if self._cancelled:
            raise RingClosed("ring reader was cancelled")
        if self._closed:
            raise RingClosed("ring reader is closed")
        if self._mv[_CLOSED_OFF]:
            # Closed is set after the last write, so one more look sees every message.
            self._fence()
            if not self._readable():
                raise RingClosed("ring writer closed the ring")
        elif self._writer_hung_up and not self._readable():
            # The writer sets `closed` before closing its FIFO ends, so this is a dead writer.
            raise RingClosed(f"ring writer process {self.handle.writer_pid} has exited")

    def _readable(self) -> bool:
        slot = self._next
        mv = self._mv
        return mv[self._layout.flag_offs[slot]] == 1 and mv[self._ack_offs[slot]] == 0

    def _try_read(self) -> list[memoryview] | None:
        if self._closed or not self._readable():
            return None
        self._fence()
        layout = self._layout
        slot = self._next
        mv = self._mv
        base = layout.slot_offs[slot]
        kind, n_frames, body_bytes, seq = _SLOT_HDR.unpack_from(mv, base)
        if seq != self._seq:
            raise RuntimeError(
                f"ring {self.handle.name}: reader {self.rank} expected message {self._seq}, found {seq}"
            )
        if kind == KIND_INLINE:
            start = base + _SLOT_HDR.size
            body = bytearray(mv[start : start + body_bytes])
        else:
            start = base + _SLOT_HDR.size + 1
            name = bytes(mv[start : start + mv[start - 1]]).decode()
            body = bytearray(self._overflow_segment(slot, name).buf[:body_bytes])
        self._fence()  # the copy is complete before the ack lets the writer reuse the slot
        mv[self._ack_offs[slot]] = 1
        self._next = (slot + 1) % layout.n_slots
        self._seq += 1
        lengths = struct.unpack_from(f"<{n_frames}Q", body, 0)
        offsets, _ = _body_layout(lengths)
        view = memoryview(body)
        return [view[off : off + n] for off, n in zip(offsets, lengths)]

    def _overflow_segment(self, slot: int, name: str) -> SharedSegment:
        segment = self._overflow.get(slot)
        if segment is not None and segment.name == name:
            return segment
        if segment is not None:
            segment.close()
        try:
            segment = SharedSegment.attach(name)
        except FileNotFoundError:
            raise RingClosed(f"overflow segment {name} is gone (the writer closed the ring)") from None
        self._overflow[slot] = segment
        return segment

    def _writer_alive(self) -> bool:
        pid = self.handle.writer_pid
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    # ------------------------------------------------------------------------------ teardown

    def cancel(self) -> None:
        """Wake a blocked dequeue (from another thread) and make it, and every later one, raise
        RingClosed."""
        self._cancelled = True
        with self._wake_lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # the pipe is full: already signalled
                os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Detach (never unlinks: the writer owns the segments). Idempotent."""
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        os.close(self._fifo)
        for segment in self._overflow.values():
            segment.close()
        self._overflow.clear()
        self._mv = memoryview(b"")
        self._segment.close()

    def __enter__(self) -> ShmRingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
