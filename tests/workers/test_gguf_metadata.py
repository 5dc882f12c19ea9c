"""The GGUF header reader against the gguf package's own GGUFReader."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from workers.loaders.gguf_metadata import read_gguf_scalars

SCALARS = {
    "t.u8": (gguf.GGUFValueType.UINT8, 200),
    "t.i8": (gguf.GGUFValueType.INT8, -100),
    "t.u16": (gguf.GGUFValueType.UINT16, 60000),
    "t.i16": (gguf.GGUFValueType.INT16, -30000),
    "t.u32": (gguf.GGUFValueType.UINT32, 4_000_000_000),
    "t.i32": (gguf.GGUFValueType.INT32, -1),
    "t.u64": (gguf.GGUFValueType.UINT64, 2**63 + 5),
    "t.i64": (gguf.GGUFValueType.INT64, -(2**40)),
    "t.f32": (gguf.GGUFValueType.FLOAT32, 0.7),
    "t.f64": (gguf.GGUFValueType.FLOAT64, 0.1),
    "t.bool": (gguf.GGUFValueType.BOOL, True),
    "t.str": (gguf.GGUFValueType.STRING, "héllo"),
}


def write(path: Path, endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> None:
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    # Arrays before, between and after the scalars: the reader must step over every kind.
    writer.add_token_list([f"tok{i}" * (i % 5) for i in range(300)])
    writer.add_array("t.ints", list(range(50)))
    for key, (value_type, value) in SCALARS.items():
        writer.add_key_value(key, value, value_type)
        writer.add_array(f"{key}.nested", [[1, 2], [3]])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_scalars_match_the_gguf_reader(tmp_path: Path, endian: gguf.GGUFEndian) -> None:
    path = tmp_path / "meta.gguf"
    write(path, endian)
    reader = gguf.GGUFReader(path)
    keys = [*SCALARS, "tokenizer.ggml.eos_token_id", "general.architecture", "t.absent"]
    found = read_gguf_scalars(path, [*keys, "t.ints", "tokenizer.ggml.tokens"])
    assert set(found) == set(keys) - {"t.absent"}  # arrays are not scalars
    for key, value in found.items():
        expected = reader.get_field(key).contents()
        if key == "t.f32":
            # The shortest decimal that is the same float32: what was written.
            assert np.float32(value) == np.float32(expected) and value == 0.7
        else:
            assert value == expected and type(value) is type(expected), key


def test_not_gguf_or_truncated_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "meta.gguf"
    write(path)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match="is not a GGUF file"):
        read_gguf_scalars(other, ["x"])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="malformed GGUF metadata"):
        read_gguf_scalars(truncated, ["tokenizer.ggml.eos_token_id"])
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(16))
    with pytest.raises(ValueError, match="GGUF version 1 is not supported"):
        read_gguf_scalars(old, ["x"])
