"""The executor <-> worker channel: its message kinds and framing, its rings, the start-up payload.

Both ends import it: the executor (core.mp_executor) and every rank's worker process (the entry
point the executor starts by name). Every message is ``[kind byte, *ipc.serialization frames]``;
the kind byte says which Decoder reads the rest, since the array_like wire structs carry no tag
of their own::

    executor ──ShmRingWriter (1 writer, world_size readers)──▶ every rank
                 EXECUTE  SchedulerOutput      every rank runs it; the collectives keep them in step
                 UTILITY  UtilityCall          every rank runs it and answers
    rank r   ──its own ShmRingWriter (1 reader: the executor)──▶ executor
                 OUTPUT   ModelRunnerOutput    rank 0 only, one per EXECUTE, in order; step N's
                                               may follow step N+1's launch (async scheduling)
                 RESULT   UtilityResult        every rank per UTILITY; any rank whose
                                               execute_model raised (call_id EXECUTE_CALL_ID)
    rank r   ──multiprocessing Pipe (startup, then parent-death detection)──▶ executor
                 READY    Handshake            info carries the rank's reply-ring handle
                 FAILED   UtilityResult        the startup error (type, message, traceback)

A pipe message is one buffer, the kind byte followed by the one frame of a message without arrays.

Why a reply ring rather than a ZeroMQ PUSH socket: the reply sits on the critical path of every
step, and the ring answers in one shared-memory hop (microseconds while the executor spins, one
FIFO write when it sleeps), where ZeroMQ adds two I/O-thread hops (see ipc/shm_ring.py). The
price is a shm segment owned by the worker: a worker that dies hard cannot unlink it, so the
executor removes it after the worker has gone (:func:`remove_ring_files`).
"""

from __future__ import annotations

import _posixshmem
import contextlib
import enum
import glob
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from typing import Any

import msgspec

from ipc.config import EngineConfig
from ipc.serialization import Encoder, WireError
from ipc.shm_ring import RingHandle


class MsgKind(enum.IntEnum):
    """The first frame (one byte) of every executor <-> worker message."""

    EXECUTE = 0  # SchedulerOutput, broadcast
    UTILITY = 1  # UtilityCall, broadcast
    OUTPUT = 2  # ModelRunnerOutput, rank 0 -> executor
    RESULT = 3  # UtilityResult, any rank -> executor
    READY = 4  # Handshake, startup pipe
    FAILED = 5  # UtilityResult, startup pipe


# The kind frames, built once: they lead every message of every step.
_KIND_FRAMES = tuple(bytes((kind.value,)) for kind in MsgKind)

EXECUTE_CALL_ID = -1  # call_id of the UtilityResult that reports a failed execute_model
STARTUP_CALL_ID = -2  # call_id of the FAILED startup report

# The broadcast ring: scheduler outputs, up to a few steps ahead of the slowest rank.
BROADCAST_SLOTS = 8
BROADCAST_SLOT_BYTES = 1 << 20
# The reply ring: one small message per step (token ids; logprobs when asked), larger ones
# take the ring's overflow path.
REPLY_RING_SLOTS = 4
REPLY_RING_SLOT_BYTES = 256 << 10


def encode_message(encoder: Encoder, kind: MsgKind, msg: msgspec.Struct) -> list[Any]:
    """The frames of ``msg`` sent as ``kind`` over a ring."""
    return [_KIND_FRAMES[kind], *encoder.encode(msg)]


def split_message(frames: Sequence[Any]) -> tuple[int, Sequence[Any]]:
    """A ring message's kind (compare with MsgKind) and the frames its Decoder reads."""
    return frames[0][0], frames[1:]


def encode_startup(encoder: Encoder, kind: MsgKind, msg: msgspec.Struct) -> bytes:
    """``msg`` sent as ``kind`` over the startup pipe: one buffer, so no arrays."""
    frames = encoder.encode(msg)
    if len(frames) != 1:
        raise WireError("startup messages must not carry arrays")
    return _KIND_FRAMES[kind] + bytes(frames[0])


def split_startup(data: bytes) -> tuple[int, memoryview]:
    """A startup pipe message's kind and the one frame its Decoder reads."""
    if not data:
        raise WireError("empty startup message")
    view = memoryview(data)
    return view[0], view[1:]


def ring_spin_s(device: str) -> float:
    """How long a ring reader spins before it sleeps, for readers on either side of the channel.

    On CUDA the host mostly waits for the GPU, so spinning costs an otherwise idle core and saves a
    wake-up per message. On CPU the cores do the model's work, and a waiter that spins through a
    forward pass takes cycles from the very ranks it waits for: spin only across the short gaps
    between steps (schedule + update), then sleep."""
    return 0.05 if device == "cuda" else 0.002


def remove_ring_files(handle: RingHandle) -> bool:
    """Unlink what a ring writer left behind (its segment, overflow segments, wake-up FIFOs) after
    the writer's process has gone without closing it. Returns whether anything was left.

    Only for a writer that is dead: a live one still uses these names."""
    removed = False
    names = [handle.name]
    if os.path.isdir("/dev/shm"):  # overflow segments are named "<ring>_o<slot>_<generation>"
        names += [os.path.basename(p) for p in glob.glob(f"/dev/shm/{glob.escape(handle.name)}_o*")]
    for name in names:
        try:
            _posixshmem.shm_unlink("/" + name)
        except FileNotFoundError:
            continue
        removed = True
        # The segment was registered with the resource tracker that this process tree shares;
        # forget it there too, or the tracker warns about a leak (and unlinks again) at exit.
        with contextlib.suppress(Exception):
            resource_tracker.unregister("/" + name, "shared_memory")
    if os.path.isdir(handle.wake_dir):
        shutil.rmtree(handle.wake_dir, ignore_errors=True)
        removed = True
    return removed


@dataclass(frozen=True, slots=True)
class WorkerProcArgs:
    """Everything a worker process starts from (pickled once, by ipc.process.start_process)."""

    config: EngineConfig
    rank: int
    local_rank: int  # the device index on this host
    world_size: int
    dist_init_method: str  # torch.distributed rendezvous (file:// or tcp://), chosen by the executor
    broadcast: RingHandle  # the executor's broadcast ring
    conn_fd: int  # a Connection's fd: startup reports out; EOF means the executor's process is gone
    parent_pid: int
    worker_cls: type | None = None  # the worker process's default Worker unless a test swaps it
    log_level: int = logging.WARNING
    dist_timeout_s: float = 600.0
