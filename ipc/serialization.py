"""msgspec msgpack encoding of wire messages, with numpy arrays and torch tensors as raw frames.

A message encodes to a list of frames ``[header, *aux]``:

* ``header`` is a 4-byte prefix (magic ``b"PS"`` + the little-endian u16 ``WIRE_SCHEMA_VERSION``)
  followed by the msgpack body. The version sits outside the msgpack so that a peer speaking another
  version fails with :class:`WireVersionError` *before* msgspec tries (and fails confusingly) to
  validate the body against the wrong schema.
* Each numpy array / CPU tensor of at least ``zero_copy_threshold`` bytes becomes one ``aux`` frame
  holding a flat byte view of its memory (no copy); the body carries a msgpack Ext that names the
  dtype, the shape and the frame index. Smaller ones travel inline in the Ext, since an extra ZeroMQ
  frame costs more than copying a few hundred bytes.

Arrays are self-describing Ext values, so they survive ``Any``-typed fields (utility-call arguments)
as well as fields annotated ``np.ndarray`` / ``torch.Tensor``. Nothing is ever pickled: an object
msgspec cannot encode raises ``TypeError``.

Decoding is zero-copy: arrays from aux frames are views of the received buffers
(``np.frombuffer`` / ``torch.frombuffer``), so keep the frames alive and do not reuse them while
the arrays are in use. Inline arrays are copied so that they own their memory. torch is imported
lazily: a process that never sees a tensor (the frontend) never pays for importing it.
"""

from __future__ import annotations

import logging
import struct
import sys
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec
import numpy as np

from ipc.messages import WIRE_SCHEMA_VERSION

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAGIC = b"PS"
_PREFIX = struct.Struct("<2sH")  # magic, schema version
PREFIX_BYTES = _PREFIX.size

# Arrays below this many bytes travel inline (vLLM uses the same 256 B default).
DEFAULT_ZERO_COPY_THRESHOLD = 256

# msgpack Ext type codes. Inline payloads carry the raw bytes, aux payloads a frame index.
EXT_NDARRAY_INLINE = 1
EXT_NDARRAY_AUX = 2
EXT_TENSOR_INLINE = 3
EXT_TENSOR_AUX = 4

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")


class WireError(ValueError):
    """A received message is malformed (not ours, truncated, missing frames, bad array header)."""


class WireVersionError(WireError):
    """The peer speaks another wire schema version."""

    def __init__(self, peer_version: int, local_version: int = WIRE_SCHEMA_VERSION) -> None:
        self.peer_version = peer_version
        self.local_version = local_version
        super().__init__(
            f"wire schema version mismatch: the peer sent version {peer_version} but this process "
            f"speaks version {local_version}; run the same pagedserve build in every process"
        )


def check_wire_version(peer_version: int) -> None:
    """Raise :class:`WireVersionError` unless ``peer_version`` is ours (use it on handshakes)."""
    if peer_version != WIRE_SCHEMA_VERSION:
        raise WireVersionError(peer_version)


def wire_version_of(header: Any) -> int:
    """The schema version stamped on a header frame (raises :class:`WireError` if it is not ours)."""
    view = memoryview(header)
    if view.nbytes < PREFIX_BYTES:
        raise WireError(f"header frame too short ({view.nbytes} bytes) to be a pagedserve message")
    magic, version = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError(f"not a pagedserve message (magic {bytes(magic)!r}, expected {MAGIC!r})")
    return int(version)


# ------------------------------------------------------------------------------- array headers


def _pack_array_header(dtype: str, shape: Sequence[int]) -> bytes:
    name = dtype.encode("ascii")
    ndim = len(shape)
    return struct.pack(f"<B{len(name)}sB{ndim}q", len(name), name, ndim, *shape)


def _unpack_array_header(data: memoryview) -> tuple[str, tuple[int, ...], int]:
    """Returns (dtype name, shape, offset of what follows)."""
    try:
        (name_len,) = _U8.unpack_from(data, 0)
        name = bytes(data[1 : 1 + name_len]).decode("ascii")
        (ndim,) = _U8.unpack_from(data, 1 + name_len)
        off = 2 + name_len
        shape = struct.unpack_from(f"<{ndim}q", data, off)
    except (struct.error, UnicodeDecodeError) as e:
        raise WireError(f"malformed array header: {e}") from e
    if any(d < 0 for d in shape):
        raise WireError(f"malformed array header: negative dimension in {shape}")
    return name, shape, off + 8 * ndim


def _flat_bytes_of_ndarray(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.hasobject or arr.dtype.fields is not None or arr.dtype.subdtype is not None:
        raise TypeError(
            f"cannot send a numpy array of dtype {arr.dtype!r} on the wire (object, structured and "
            "subarray dtypes are refused; nothing is pickled)"
        )
    # ascontiguousarray copies only when needed (a non-contiguous view); the uint8 view is free.
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def _flat_bytes_of_tensor(t: Any, torch: Any) -> np.ndarray:
    if t.device.type != "cpu":
        raise TypeError(
            f"cannot send a tensor on {t.device} on the wire; move it to CPU first (device "
            "tensors would need a CUDA IPC path, which the wire does not have)"
        )
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"cannot send a {t.layout} / quantized tensor on the wire")
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _torch_dtype(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WireError(f"unknown torch dtype {name!r} on the wire")
    return dtype


# ------------------------------------------------------------------------------------ encoder


class Encoder:
    """Encodes wire messages to ``[header, *aux]`` frames.

    Not thread-safe (it collects aux frames while encoding): use one per thread.
    """

    __slots__ = ("_aux", "_encoder", "_prefix", "_threshold")

    def __init__(self, *, zero_copy_threshold: int = DEFAULT_ZERO_COPY_THRESHOLD) -> None:
        self._threshold = zero_copy_threshold
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._prefix = _PREFIX.pack(MAGIC, WIRE_SCHEMA_VERSION)
        self._aux: list[memoryview] | None = None

    def encode(self, msg: Any) -> list[bytes | bytearray | memoryview]:
        """Encode ``msg``; the returned aux frames alias the arrays' memory (do not mutate them
        until the frames have been sent)."""
        aux: list[memoryview] = []
        self._aux = aux
        try:
            header = bytearray(self._prefix)
            self._encoder.encode_into(msg, header, PREFIX_BYTES)
        finally:
            self._aux = None
        return [header, *aux]

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            flat = _flat_bytes_of_ndarray(obj)
            return self._array_ext(flat, obj.dtype.str, obj.shape, EXT_NDARRAY_INLINE, EXT_NDARRAY_AUX)
        if isinstance(obj, np.generic):
            return obj.item()
        torch = sys.modules.get("torch")  # a process that never imported torch has no tensors
        if torch is not None and isinstance(obj, torch.Tensor):
            flat = _flat_bytes_of_tensor(obj, torch)
            name = str(obj.dtype).removeprefix("torch.")
            return self._array_ext(flat, name, tuple(obj.shape), EXT_TENSOR_INLINE, EXT_TENSOR_AUX)
        raise TypeError(f"type {type(obj).__qualname__} is not allowed on the wire (nothing is pickled)")

    def _array_ext(
        self, flat: np.ndarray, dtype: str, shape: Sequence[int], inline_code: int, aux_code: int
    ) -> msgspec.msgpack.Ext:
        header = _pack_array_header(dtype, shape)
        if flat.nbytes < self._threshold or self._aux is None:
            return msgspec.msgpack.Ext(inline_code, header + flat.tobytes())
        self._aux.append(flat.data)
        return msgspec.msgpack.Ext(aux_code, header + _U32.pack(len(self._aux) - 1))


# ------------------------------------------------------------------------------------ decoder


class Decoder(Generic[T]):
    """Decodes ``[header, *aux]`` frames into a ``type_`` (any msgspec-supported type).

    Not thread-safe (it holds the current aux frames while decoding): use one per thread.
    """

    __slots__ = ("_aux", "_decoder", "type")

    def __init__(self, type_: type[T] | Any = Any) -> None:
        self.type = type_
        self._decoder = msgspec.msgpack.Decoder(type_, ext_hook=self._ext_hook, dec_hook=self._dec_hook)
        self._aux: Sequence[memoryview] = ()

    def decode(self, frames: Sequence[Any]) -> T:
        """Decode frames (bytes, bytearray, memoryview, zmq.Frame, anything with the buffer protocol)."""
        if not frames:
            raise WireError("empty message (no header frame)")
        header = memoryview(frames[0])
        version = wire_version_of(header)
        if version != WIRE_SCHEMA_VERSION:
            raise WireVersionError(version)
        self._aux = [_byte_view(f) for f in frames[1:]]
        try:
            return self._decoder.decode(header[PREFIX_BYTES:])
        finally:
            self._aux = ()

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code in (EXT_NDARRAY_INLINE, EXT_NDARRAY_AUX):
            dtype_name, shape, off = _unpack_array_header(data)
            try:
                dtype = np.dtype(dtype_name)
            except TypeError as e:
                raise WireError(f"unknown numpy dtype {dtype_name!r} on the wire") from e
            if code == EXT_NDARRAY_INLINE:
                # Copy: ``data`` aliases the header frame, which the caller may recycle.
                buf: Any = bytearray(data[off:])
            else:
                buf = self._aux_frame(data, off)
            nbytes = _check_size(buf, dtype.itemsize, shape)
            return np.frombuffer(buf, dtype=dtype, count=nbytes // max(dtype.itemsize, 1)).reshape(shape)
        if code in (EXT_TENSOR_INLINE, EXT_TENSOR_AUX):
            import torch

            dtype_name, shape, off = _unpack_array_header(data)
            dtype = _torch_dtype(dtype_name)
            if code == EXT_TENSOR_INLINE:
                buf = bytearray(data[off:])  # the clone: the tensor owns this fresh buffer
            else:
                buf = self._aux_frame(data, off)
                if buf.readonly:
                    # torch has no read-only tensors; writing through one would corrupt an
                    # immutable bytes object, so copy. Receive with copy=False to stay zero-copy.
                    buf = bytearray(buf)
            nbytes = _check_size(buf, dtype.itemsize, shape)
            if nbytes == 0:
                return torch.empty(shape, dtype=dtype)  # torch.frombuffer refuses empty buffers
            return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)
        raise WireError(f"unknown msgpack extension type {code} on the wire")

    def _aux_frame(self, data: memoryview, off: int) -> memoryview:
        try:
            (index,) = _U32.unpack_from(data, off)
        except struct.error as e:
            raise WireError("malformed array header: no frame index") from e
        if index >= len(self._aux):
            raise WireError(
                f"message refers to aux frame {index} but only {len(self._aux)} aux frames arrived"
            )
        return self._aux[index]

    @staticmethod
    def _dec_hook(type_: Any, obj: Any) -> Any:
        # Arrays were already built by _ext_hook; only check that they match the annotation.
        if isinstance(type_, type) and isinstance(obj, type_):
            return obj
        raise TypeError(f"expected {getattr(type_, '__qualname__', type_)}, got {type(obj).__qualname__}")


def _byte_view(frame: Any) -> memoryview:
    view = memoryview(frame)
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B")


def _check_size(buf: Any, itemsize: int, shape: tuple[int, ...]) -> int:
    expected = itemsize
    for d in shape:
        expected *= d
    got = memoryview(buf).nbytes
    if got != expected:
        raise WireError(f"array of shape {shape} needs {expected} bytes but {got} arrived")
    return got


def encode(msg: Any) -> list[bytes | bytearray | memoryview]:
    """One-off encode (builds an Encoder; keep one around on hot paths)."""
    return Encoder().encode(msg)


def decode(frames: Sequence[Any], type_: type[T] | Any = Any) -> T:
    """One-off decode (builds a Decoder; keep one around on hot paths)."""
    return Decoder(type_).decode(frames)
