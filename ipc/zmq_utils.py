"""ZeroMQ helpers: private ipc:// endpoints, socket construction, typed multipart send/recv.

Every message on every socket is ``[identity?] [type byte] [header] [*aux]``: a ROUTER prepends the
peer identity, then one byte of :class:`RequestType` says how to decode the rest (the serialization
frames of ``ipc.serialization``). Sends are zero-copy (``copy=False``); receives hand pyzmq Frames
to the decoder, so arrays in the message are views of the received memory.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from ipc.serialization import Decoder, Encoder, WireError

logger = logging.getLogger(__name__)

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_IPC_PATH = 107

# Bounded linger: unsent messages get this long at close, and context.term() can never hang.
DEFAULT_LINGER_MS = 1000


class RequestType(bytes, enum.Enum):
    """First frame of every message: what the payload is, hence which Decoder reads it."""

    ADD = b"\x00"  # EngineCoreRequest
    ABORT = b"\x01"  # list[str] of request ids
    UTILITY = b"\x02"  # UtilityCall
    SHUTDOWN = b"\x03"  # no payload (None)
    HANDSHAKE = b"\x04"  # Handshake
    OUTPUTS = b"\x05"  # EngineCoreOutputs
    UTILITY_RESULT = b"\x06"  # UtilityResult


class IpcDir:
    """A private directory (mode 0700, from ``tempfile.mkdtemp``) holding ipc:// socket files.

    Only this user can connect to sockets inside it. The directory and everything in it is
    removed on :meth:`close`, on garbage collection, or at interpreter exit, whichever comes first.
    """

    __slots__ = ("__weakref__", "_finalizer", "path")

    def __init__(self, prefix: str = "pagedserve-", base: str | None = None) -> None:
        self.path = tempfile.mkdtemp(prefix=prefix, dir=base)  # mkdtemp creates it 0700
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def endpoint(self, name: str) -> str:
        """``ipc://<dir>/<name>``; raises ValueError if the path is too long for a unix socket."""
        if not name or "/" in name:
            raise ValueError(f"bad ipc endpoint name {name!r}")
        path = os.path.join(self.path, name)
        if len(path.encode()) > _MAX_IPC_PATH:
            raise ValueError(
                f"ipc socket path {path!r} is longer than {_MAX_IPC_PATH} bytes; set TMPDIR to a shorter directory"
            )
        return f"ipc://{path}"

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> IpcDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_socket(
    ctx: zmq.Context[Any],
    socket_type: int,
    addr: str,
    *,
    bind: bool,
    linger_ms: int = DEFAULT_LINGER_MS,
    hwm: int = 0,
    identity: bytes | None = None,
    buf_bytes: int | None = None,
) -> zmq.Socket[Any]:
    """Create, configure and bind/connect a socket (sync or asyncio, as ``ctx`` is).

    ``hwm=0`` (unbounded queues, vLLM's choice too) because the engine already bounds what is in
    flight; a bounded queue would instead block the engine loop (PUSH/DEALER) or silently drop
    messages (PUB). ROUTER sockets get ROUTER_MANDATORY so a send to a vanished peer raises
    instead of vanishing.
    """
    sock = ctx.socket(socket_type)
    try:
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if buf_bytes is not None:
            sock.setsockopt(zmq.SNDBUF, buf_bytes)
            sock.setsockopt(zmq.RCVBUF, buf_bytes)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if socket_type == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if bind:
            sock.bind(addr)
        else:
            sock.connect(addr)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


@dataclass(slots=True)
class Received:
    """One decoded message; ``identity`` is set only for messages received on a ROUTER."""

    request_type: RequestType
    message: Any
    identity: bytes | None = None


Decoders = Decoder[Any] | Mapping[RequestType, Decoder[Any]]


def pack_message(
    encoder: Encoder, request_type: RequestType, msg: Any, *, identity: bytes | None = None
) -> list[Any]:
    """The multipart frames for ``msg``: ``[identity?, type, header, *aux]``."""
    frames: list[Any] = [identity] if identity is not None else []
    frames.append(request_type.value)
    frames.extend(encoder.encode(msg))
    return frames


def unpack_message(frames: list[Any], decoders: Decoders, *, routed: bool = False) -> Received:
    """Decode frames as received (``zmq.Frame``, bytes or buffers) into a :class:`Received`."""
    identity: bytes | None = None
    if routed:
        if not frames:
            raise WireError("empty message from a ROUTER (no identity frame)")
        identity = bytes(memoryview(frames[0]))
        frames = frames[1:]
    if len(frames) < 2:
        raise WireError(f"message has {len(frames)} frames; expected a type byte and a header")
    type_byte = bytes(memoryview(frames[0]))
    try:
        request_type = RequestType(type_byte)
    except ValueError:
        raise WireError(f"unknown request type byte {type_byte!r}") from None
    if isinstance(decoders, Decoder):
        decoder = decoders
    else:
        decoder = decoders.get(request_type)  # type: ignore[assignment]
        if decoder is None:
            raise WireError(f"no decoder for request type {request_type.name} on this socket")
    return Received(request_type, decoder.decode(frames[1:]), identity)


def _timeout_ms(timeout: float | None) -> int | None:
    return None if timeout is None else max(0, int(timeout * 1000))


def send_message(
    sock: zmq.Socket[Any],
    encoder: Encoder,
    request_type: RequestType,
    msg: Any,
    *,
    identity: bytes | None = None,
    timeout: float | None = None,
    track: bool = False,
) -> zmq.MessageTracker | None:
    """Send one message, zero-copy. Arrays in ``msg`` must not be mutated until the returned
    tracker (``track=True``) says ZeroMQ is done with them. Raises TimeoutError if the socket
    cannot take the message within ``timeout`` seconds."""
    frames = pack_message(encoder, request_type, msg, identity=identity)
    if timeout is not None and not sock.poll(_timeout_ms(timeout), zmq.POLLOUT):
        raise TimeoutError(f"socket not writable within {timeout} s")
    return sock.send_multipart(frames, copy=False, track=track)


def recv_message(
    sock: zmq.Socket[Any], decoders: Decoders, *, routed: bool = False, timeout: float | None = None
) -> Received:
    """Receive and decode one message; TimeoutError if none arrives within ``timeout`` seconds."""
    if timeout is not None and not sock.poll(_timeout_ms(timeout), zmq.POLLIN):
        raise TimeoutError(f"no message within {timeout} s")
    frames = sock.recv_multipart(copy=False)
    return unpack_message(frames, decoders, routed=routed)


async def send_message_async(
    sock: zmq.asyncio.Socket,
    encoder: Encoder,
    request_type: RequestType,
    msg: Any,
    *,
    identity: bytes | None = None,
    timeout: float | None = None,
    track: bool = False,
) -> zmq.MessageTracker | None:
    """asyncio variant of :func:`send_message`."""
    frames = pack_message(encoder, request_type, msg, identity=identity)
    fut = sock.send_multipart(frames, copy=False, track=track)
    return await asyncio.wait_for(fut, timeout) if timeout is not None else await fut


async def recv_message_async(
    sock: zmq.asyncio.Socket, decoders: Decoders, *, routed: bool = False, timeout: float | None = None
) -> Received:
    """asyncio variant of :func:`recv_message`. Cancelling it loses no message: pyzmq only takes
    a message off the socket when the receive completes."""
    fut = sock.recv_multipart(copy=False)
    # asyncio.wait_for raises the builtin TimeoutError (Python >= 3.11).
    frames = await asyncio.wait_for(fut, timeout) if timeout is not None else await fut
    return unpack_message(frames, decoders, routed=routed)
