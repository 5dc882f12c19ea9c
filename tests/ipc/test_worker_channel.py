"""The executor <-> worker channel: the kind byte leads every message, the rest is the message's
ipc.serialization frames, a startup message is one buffer; a dead writer's ring files go."""

from __future__ import annotations

import glob
import os
import pickle
import signal
from pathlib import Path

import msgspec
import numpy as np
import pytest

from ipc.messages import ModelRunnerOutput, UtilityResult
from ipc.process import start_process
from ipc.serialization import Decoder, Encoder, WireError
from ipc.shm_ring import RingHandle, ShmRingReader, ShmRingWriter
from ipc.worker_channel import (
    MsgKind,
    encode_message,
    encode_startup,
    remove_ring_files,
    split_message,
    split_startup,
)

pytestmark = pytest.mark.timeout(60)


def _output() -> ModelRunnerOutput:
    return ModelRunnerOutput(req_ids=["a", "b"], sampled_token_ids=[7, 11])


def test_kind_byte_leads_the_message_frames() -> None:
    encoder = Encoder()
    msg = _output()
    for kind in MsgKind:
        frames = encode_message(encoder, kind, msg)
        assert bytes(frames[0]) == bytes([kind.value])
        assert [bytes(f) for f in frames[1:]] == [bytes(f) for f in encoder.encode(msg)]
        got_kind, body = split_message([memoryview(bytes(f)) for f in frames])
        assert got_kind == kind
        assert msgspec.to_builtins(Decoder(ModelRunnerOutput).decode(body)) == msgspec.to_builtins(msg)


def test_messages_with_arrays_cross_a_ring() -> None:
    """A message whose arrays travel as frames of their own keeps them behind the kind byte."""
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    encoder = Encoder(zero_copy_threshold=0)
    frames = encode_message(encoder, MsgKind.RESULT, UtilityResult(call_id=3, result=rows))
    assert len(frames) > 2  # the arrays are frames of their own
    with ShmRingWriter(1, n_slots=2, slot_bytes=4096, spin_s=0.001) as writer:
        reader = ShmRingReader(writer.handle, 0, spin_s=0.001)
        try:
            writer.wait_for_readers(10)
            writer.enqueue_frames(frames, timeout=10)
            kind, body = split_message(reader.dequeue_frames(timeout=10))
        finally:
            reader.close()
    assert kind == MsgKind.RESULT
    result = Decoder(UtilityResult).decode(body)
    assert result.call_id == 3
    np.testing.assert_array_equal(result.result, rows)


def test_startup_message_is_one_buffer() -> None:
    encoder = Encoder()
    msg = UtilityResult(call_id=-2, result={"type": "ValueError", "message": "no"}, error="tb")
    data = encode_startup(encoder, MsgKind.FAILED, msg)
    assert isinstance(data, bytes) and data[0] == MsgKind.FAILED
    kind, body = split_startup(data)
    assert kind == MsgKind.FAILED
    assert Decoder(UtilityResult).decode([body]) == msg
    with pytest.raises(WireError, match="must not carry arrays"):
        encode_startup(
            Encoder(zero_copy_threshold=0), MsgKind.READY, UtilityResult(call_id=0, result=np.ones(64))
        )
    with pytest.raises(WireError, match="empty startup message"):
        split_startup(b"")


def _leftovers(handle: RingHandle) -> list[str]:
    return glob.glob(f"/dev/shm/{glob.escape(handle.name)}*") + (
        [handle.wake_dir] if os.path.exists(handle.wake_dir) else []
    )


def dying_writer(handle_path: str) -> None:
    """A ring writer that leaves an overflow segment behind and dies without closing anything."""
    writer = ShmRingWriter(1, n_slots=2, slot_bytes=256, spin_s=0.001)
    writer.enqueue_frames([b"x" * 4096])  # larger than a slot: the overflow path
    Path(handle_path).write_bytes(pickle.dumps(writer.handle))
    os.kill(os.getpid(), signal.SIGKILL)


def test_remove_ring_files_after_the_writer_was_killed(tmp_path: Path) -> None:
    handle_path = tmp_path / "handle.pickle"
    proc = start_process("dying-ring-writer", __name__, "dying_writer", (str(handle_path),))
    try:
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        proc.close()
    handle: RingHandle = pickle.loads(handle_path.read_bytes())
    left = _leftovers(handle)
    assert any("_o" in os.path.basename(p) for p in left), left  # the overflow segment
    assert os.path.exists(f"/dev/shm/{handle.name}") and os.path.isdir(handle.wake_dir)
    assert remove_ring_files(handle)
    assert not _leftovers(handle)
    assert not remove_ring_files(handle)  # nothing left the second time
