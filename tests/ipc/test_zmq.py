"""ZeroMQ helpers: private ipc dirs, socket options, typed zero-copy multipart messages, sync + asyncio."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

from ipc.messages import (
    WIRE_SCHEMA_VERSION,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    Handshake,
    UtilityCall,
    UtilityResult,
)
from ipc.sampling_params import SamplingParams
from ipc.serialization import Decoder, Encoder, WireError
from ipc.zmq_utils import (
    IpcDir,
    Received,
    RequestType,
    make_socket,
    pack_message,
    recv_message,
    recv_message_async,
    send_message,
    send_message_async,
    unpack_message,
)

pytestmark = pytest.mark.timeout(60)

ENGINE_DECODERS: dict[RequestType, Decoder[Any]] = {
    RequestType.ADD: Decoder(EngineCoreRequest),
    RequestType.ABORT: Decoder(list[str]),
    RequestType.UTILITY: Decoder(UtilityCall),
    RequestType.SHUTDOWN: Decoder(None),
    RequestType.HANDSHAKE: Decoder(Handshake),
}


@pytest.fixture
def ipc_dir() -> Iterator[IpcDir]:
    with IpcDir() as d:
        yield d


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _request(i: int) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=f"r{i}", prompt_token_ids=list(range(i, i + 10)), sampling_params=SamplingParams()
    )


# ------------------------------------------------------------------------------------ IpcDir


def test_ipc_dir_is_private_and_removed_on_close() -> None:
    d = IpcDir()
    assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o700
    addr = d.endpoint("input")
    assert addr == f"ipc://{d.path}/input"
    open(os.path.join(d.path, "stray"), "w").close()
    d.close()
    assert d.closed and not os.path.exists(d.path)
    d.close()  # idempotent


def test_ipc_dir_removed_when_garbage_collected() -> None:
    d = IpcDir()
    path = d.path
    del d
    assert not os.path.exists(path)


def test_ipc_endpoint_validation(tmp_path: Any) -> None:
    with IpcDir() as d:
        for bad in ["", "a/b"]:
            with pytest.raises(ValueError):
                d.endpoint(bad)
    deep = tmp_path / ("x" * 100)
    deep.mkdir()
    with IpcDir(base=str(deep)) as d, pytest.raises(ValueError, match="longer than"):
        d.endpoint("socket")


def test_request_types_are_distinct_single_bytes() -> None:
    values = [t.value for t in RequestType]
    assert all(len(v) == 1 for v in values) and len(set(values)) == len(values)
    assert RequestType(b"\x00") is RequestType.ADD


# --------------------------------------------------------------------------------- sockets


def test_make_socket_options(ctx: zmq.Context[Any], ipc_dir: IpcDir) -> None:
    sock = make_socket(
        ctx, zmq.PULL, ipc_dir.endpoint("s"), bind=True, linger_ms=123, hwm=7, buf_bytes=1 << 20
    )
    try:
        assert sock.getsockopt(zmq.LINGER) == 123
        assert sock.getsockopt(zmq.RCVHWM) == 7 and sock.getsockopt(zmq.SNDHWM) == 7
        assert os.path.exists(os.path.join(ipc_dir.path, "s"))
    finally:
        sock.close()


def test_make_socket_closes_on_bad_address(ctx: zmq.Context[Any]) -> None:
    with pytest.raises(zmq.ZMQError):
        make_socket(ctx, zmq.PULL, "bogus://nowhere", bind=True)


def test_router_to_unknown_peer_raises(ctx: zmq.Context[Any], ipc_dir: IpcDir) -> None:
    router = make_socket(ctx, zmq.ROUTER, ipc_dir.endpoint("r"), bind=True)
    try:
        with pytest.raises(zmq.ZMQError):
            send_message(router, Encoder(), RequestType.OUTPUTS, EngineCoreOutputs(), identity=b"nobody")
    finally:
        router.close()


def test_push_pull_every_request_type(ctx: zmq.Context[Any], ipc_dir: IpcDir) -> None:
    addr = ipc_dir.endpoint("input")
    pull = make_socket(ctx, zmq.PULL, addr, bind=True)
    push = make_socket(ctx, zmq.PUSH, addr, bind=False)
    enc = Encoder()
    weights = np.arange(50_000, dtype=np.float32)
    sent: list[tuple[RequestType, Any]] = [
        (
            RequestType.HANDSHAKE,
            Handshake(wire_schema_version=WIRE_SCHEMA_VERSION, role="frontend", pid=os.getpid()),
        ),
        (RequestType.ADD, _request(1)),
        (RequestType.ABORT, ["r1", "r7"]),
        (RequestType.UTILITY, UtilityCall(call_id=5, method="load", args=[weights, torch.ones(3)])),
        (RequestType.SHUTDOWN, None),
    ]
    try:
        for request_type, msg in sent:
            send_message(push, enc, request_type, msg, timeout=5)
        for request_type, msg in sent:
            got = recv_message(pull, ENGINE_DECODERS, timeout=5)
            assert got.request_type is request_type and got.identity is None
            if request_type is RequestType.UTILITY:
                assert np.array_equal(got.message.args[0], weights)
                # Zero-copy receive: the array views the ZeroMQ frame, which is writable.
                assert not got.message.args[0].flags.owndata and got.message.args[0].flags.writeable
                assert torch.equal(got.message.args[1], torch.ones(3))
            else:
                assert got.message == msg
    finally:
        push.close()
        pull.close()


def test_router_dealer_with_identity(ctx: zmq.Context[Any], ipc_dir: IpcDir) -> None:
    addr = ipc_dir.endpoint("router")
    router = make_socket(ctx, zmq.ROUTER, addr, bind=True)
    dealer = make_socket(ctx, zmq.DEALER, addr, bind=False, identity=b"\x00\x01")
    enc = Encoder()
    try:
        send_message(dealer, enc, RequestType.UTILITY, UtilityCall(call_id=9, method="ping"))
        got = recv_message(router, ENGINE_DECODERS, routed=True, timeout=5)
        assert got == Received(RequestType.UTILITY, UtilityCall(call_id=9, method="ping"), b"\x00\x01")
        send_message(
            router,
            enc,
            RequestType.UTILITY_RESULT,
            UtilityResult(call_id=9, result="pong"),
            identity=got.identity,
        )
        reply = recv_message(dealer, Decoder(UtilityResult), timeout=5)
        assert reply.message == UtilityResult(call_id=9, result="pong")
    finally:
        dealer.close()
        router.close()


def test_recv_timeout(ctx: zmq.Context[Any], ipc_dir: IpcDir) -> None:
    pull = make_socket(ctx, zmq.PULL, ipc_dir.endpoint("quiet"), bind=True)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            recv_message(pull, ENGINE_DECODERS, timeout=0.1)
        assert time.monotonic() - start < 2
    finally:
        pull.close()


def test_send_tracker_reports_completion(ctx: zmq.Context[Any], ipc_dir: IpcDir) -> None:
    addr = ipc_dir.endpoint("tracked")
    pull = make_socket(ctx, zmq.PULL, addr, bind=True)
    push = make_socket(ctx, zmq.PUSH, addr, bind=False)
    try:
        tracker = send_message(
            push,
            Encoder(),
            RequestType.UTILITY,
            UtilityCall(call_id=1, method="m", args=[np.ones(1 << 18)]),
            track=True,
        )
        recv_message(pull, ENGINE_DECODERS, timeout=5)
        assert tracker is not None
        tracker.wait(5)
        assert tracker.done
    finally:
        push.close()
        pull.close()


# ------------------------------------------------------------------------- pack / unpack


def test_pack_unpack_without_sockets() -> None:
    frames = pack_message(Encoder(), RequestType.ADD, _request(3), identity=b"id")
    assert frames[0] == b"id" and frames[1] == RequestType.ADD.value
    got = unpack_message(frames, ENGINE_DECODERS, routed=True)
    assert got == Received(RequestType.ADD, _request(3), b"id")


def test_unpack_errors() -> None:
    frames = pack_message(Encoder(), RequestType.OUTPUTS, EngineCoreOutputs())
    with pytest.raises(WireError, match="no decoder for request type OUTPUTS"):
        unpack_message(frames, ENGINE_DECODERS)
    with pytest.raises(WireError, match="unknown request type"):
        unpack_message([b"\xff", *frames[1:]], ENGINE_DECODERS)
    with pytest.raises(WireError, match="frames"):
        unpack_message([b"\x00"], ENGINE_DECODERS)
    with pytest.raises(WireError):
        unpack_message([], ENGINE_DECODERS, routed=True)


# ------------------------------------------------------------------------------- asyncio


def test_async_roundtrip_timeout_and_cancel(ipc_dir: IpcDir) -> None:
    async def main() -> None:
        actx = zmq.asyncio.Context()
        addr = ipc_dir.endpoint("outputs")
        pull = make_socket(actx, zmq.PULL, addr, bind=True)
        push = make_socket(actx, zmq.PUSH, addr, bind=False)
        enc, dec = Encoder(), {RequestType.OUTPUTS: Decoder(EngineCoreOutputs)}
        try:
            outputs = EngineCoreOutputs(
                outputs=[EngineCoreOutput(request_id="a", new_token_ids=[1, 2])], timestamp=1.0
            )
            await send_message_async(push, enc, RequestType.OUTPUTS, outputs, timeout=5)
            got = await recv_message_async(pull, dec, timeout=5)
            assert got.message == outputs and got.request_type is RequestType.OUTPUTS

            with pytest.raises(TimeoutError):
                await recv_message_async(pull, dec, timeout=0.05)

            # A cancelled receive must not swallow the next message.
            task = asyncio.create_task(recv_message_async(pull, dec))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await send_message_async(push, enc, RequestType.OUTPUTS, EngineCoreOutputs(timestamp=2.0))
            got = await recv_message_async(pull, dec, timeout=5)
            assert got.message.timestamp == 2.0

            # Many in flight, in order.
            for i in range(200):
                await send_message_async(
                    push, enc, RequestType.OUTPUTS, EngineCoreOutputs(timestamp=float(i))
                )
            stamps = [(await recv_message_async(pull, dec, timeout=5)).message.timestamp for _ in range(200)]
            assert stamps == [float(i) for i in range(200)]
        finally:
            push.close()
            pull.close()
            actx.term()

    asyncio.run(main())
