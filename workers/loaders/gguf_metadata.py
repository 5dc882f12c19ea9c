"""Scalar metadata from a GGUF file's header, read without decoding its arrays.

``gguf.GGUFReader`` decodes every field, the tokenizer's vocabulary and merges included (about
100k strings for SmolLM2, seconds on a loaded machine). The engine config needs a few scalars
before the engine starts, so this walks the header and steps over each array by its lengths.

The layout is GGUF's (version 2 and later): the magic ``GGUF``, a uint32 version, uint64 tensor
and key/value counts, then per key a uint64-length-prefixed UTF-8 name, a uint32 value type and
the value. A file written big-endian shows a byte-swapped version, as the ``gguf`` package checks.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

GGUFScalar = int | float | bool | str

_MAGIC = b"GGUF"
# GGUF value type -> struct format of one value.
_FORMATS: dict[int, str] = {
    0: "B",  # UINT8
    1: "b",  # INT8
    2: "H",  # UINT16
    3: "h",  # INT16
    4: "I",  # UINT32
    5: "i",  # INT32
    6: "f",  # FLOAT32
    7: "?",  # BOOL
    10: "Q",  # UINT64
    11: "q",  # INT64
    12: "d",  # FLOAT64
}
_FLOAT32 = 6
_STRING = 8
_ARRAY = 9


@dataclass(slots=True)
class _Header:
    """A cursor over the header's bytes in one byte order."""

    buf: mmap.mmap
    order: str  # struct's "<" or ">"
    offset: int

    def unpack(self, fmt: str) -> tuple[GGUFScalar, ...]:
        values = struct.unpack_from(self.order + fmt, self.buf, self.offset)
        self.offset += struct.calcsize(self.order + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        start = self.offset
        self.offset += int(length)
        if self.offset > len(self.buf):
            raise struct.error("string runs past the end of the file")
        return bytes(self.buf[start : self.offset]).decode("utf-8")

    def value(self, value_type: int) -> GGUFScalar:
        if value_type == _STRING:
            return self.string()
        fmt = _FORMATS.get(value_type)
        if fmt is None:
            raise struct.error(f"unknown value type {value_type}")
        value = self.unpack(fmt)[0]
        return _shortest_float32(float(value)) if value_type == _FLOAT32 else value

    def skip(self, value_type: int) -> None:
        if value_type != _ARRAY:
            self.value(value_type)
            return
        element_type, count = self.unpack("IQ")
        fmt = _FORMATS.get(int(element_type))
        if fmt is not None:
            self.offset += int(count) * struct.calcsize(self.order + fmt)
        elif element_type == _STRING:  # the vocabulary: one tight loop over the lengths
            length = struct.Struct(self.order + "Q")
            offset = self.offset
            for _ in range(int(count)):
                offset += 8 + length.unpack_from(self.buf, offset)[0]
            self.offset = offset
        else:
            for _ in range(int(count)):
                self.skip(int(element_type))


def _shortest_float32(value: float) -> float:
    """The shortest decimal that rounds to the same float32: the number the writer stored (a
    temperature written as 0.7 reads back as 0.699999988 otherwise)."""
    stored = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == stored:
            return candidate
    return value


def read_gguf_scalars(path: Path, keys: Collection[str]) -> dict[str, GGUFScalar]:
    """The values of those of ``keys`` that the file holds as single values (not arrays); float32
    values come back as the shortest decimal that rounds to the stored float32."""
    wanted = frozenset(keys)
    found: dict[str, GGUFScalar] = {}
    with open(path, "rb") as file:
        if file.read(4) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                order = "<"
                (version,) = struct.unpack_from("<I", buf, 4)
                if version & 0xFFFF == 0:
                    order = ">"
                    (version,) = struct.unpack_from(">I", buf, 4)
                if version < 2:
                    raise ValueError(f"{path}: GGUF version {version} is not supported (2 or later is)")
                header = _Header(buf, order, 8)
                _, kv_count = header.unpack("QQ")
                for _ in range(int(kv_count)):
                    key = header.string()
                    (value_type,) = header.unpack("I")
                    if key in wanted and value_type != _ARRAY:
                        found[key] = header.value(int(value_type))
                    else:
                        header.skip(int(value_type))
            except (struct.error, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}: malformed GGUF metadata ({exc})") from None
    return found
