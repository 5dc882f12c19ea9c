"""The client side of the engine-core process: start it, handshake, send requests, receive outputs.

One receiver thread reads the output socket, decodes, and hands each item to a callback (the
offline LLM's queue, or AsyncLLM's event loop). It also watches the process: if the engine core
exits, the callback gets an EngineDead item within a poll interval, so nothing waits forever.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from core.errors import EngineDeadError
from ipc.config import EngineConfig
from ipc.messages import (
    WIRE_SCHEMA_VERSION,
    EngineCoreOutputs,
    EngineCoreRequest,
    Handshake,
    UtilityCall,
    UtilityResult,
)
from ipc.process import start_process
from ipc.serialization import Decoder, Encoder
from ipc.zmq_utils import IpcDir, RequestType, make_socket, recv_message, send_message

logger = logging.getLogger(__name__)

OUTPUT_DECODERS = {
    RequestType.HANDSHAKE: Decoder(Handshake),
    RequestType.OUTPUTS: Decoder(EngineCoreOutputs),
    RequestType.UTILITY_RESULT: Decoder(UtilityResult),
}
_POLL_MS = 100
STARTUP_TIMEOUT_S = 600.0  # loading a large checkpoint can take minutes


@dataclass(frozen=True, slots=True)
class EngineDead:
    """Delivered to the output callback once, when the engine core is gone."""

    reason: str


class EngineCoreClient:
    def __init__(
        self,
        config: EngineConfig,
        on_output: Callable[[EngineCoreOutputs | EngineDead], None],
        *,
        wait: bool = True,
    ) -> None:
        """Start the engine-core process; with ``wait=False`` the caller does other start-up work
        (loading the tokenizer) while the engine loads, then calls wait_until_ready()."""
        self.config = config
        self._on_output = on_output
        self._ipc_dir = IpcDir()
        self._ctx = zmq.Context(io_threads=1)
        input_addr, output_addr = self._ipc_dir.endpoint("input"), self._ipc_dir.endpoint("output")
        self._input = make_socket(self._ctx, zmq.PUSH, input_addr, bind=True)
        self._output = make_socket(self._ctx, zmq.PULL, output_addr, bind=True)
        self._encoder = Encoder()
        self._send_lock = threading.Lock()
        self._call_ids = itertools.count()
        self._pending_calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._closing = threading.Event()
        self.dead_reason: str | None = None
        self._proc = start_process(
            "pagedserve-engine-core",
            "core.engine_core_proc",
            "run_engine_core",
            (config, input_addr, output_addr, os.getpid(), logger.getEffectiveLevel()),
        )
        logger.info("engine core process %d started", self._proc.pid)
        self.info: dict[str, Any] = {}
        if wait:
            self.wait_until_ready()

    def wait_until_ready(self) -> None:
        """Block until the engine core has loaded the model and sized its KV cache."""
        if self.info:
            return
        try:
            self.info = self._handshake()
        except BaseException:
            self._stop_process()
            self._close_sockets()
            raise
        self._receiver = threading.Thread(target=self._receive_loop, name="engine-client-recv", daemon=True)
        self._receiver.start()
        # A forgotten shutdown must not leave the engine running (or hang interpreter exit,
        # which joins non-daemon children): stop it at exit.
        atexit.register(self.shutdown)

    # ------------------------------------------------------------------ startup
    def _handshake(self) -> dict[str, Any]:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._output.poll(_POLL_MS):
                received = recv_message(self._output, OUTPUT_DECODERS)
                if received.request_type != RequestType.HANDSHAKE:
                    raise RuntimeError(f"engine core sent {received.request_type.name} before its handshake")
                handshake: Handshake = received.message
                if handshake.wire_schema_version != WIRE_SCHEMA_VERSION:
                    raise RuntimeError(
                        f"engine core speaks wire schema {handshake.wire_schema_version}, "
                        f"this frontend speaks {WIRE_SCHEMA_VERSION}"
                    )
                if "error" in handshake.info:
                    raise RuntimeError(f"the engine failed to start: {handshake.info['error']}")
                return dict(handshake.info)
            if not self._proc.is_alive():
                raise RuntimeError(
                    f"the engine core process exited during startup (exit code {self._proc.exitcode})"
                )
        raise TimeoutError(f"the engine core did not become ready within {STARTUP_TIMEOUT_S:.0f} s")

    # ------------------------------------------------------------------ requests
    def _send(self, request_type: RequestType, message: Any) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        with self._send_lock:  # the socket is shared by the caller's threads
            send_message(self._input, self._encoder, request_type, message)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(RequestType.ADD, request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self.dead_reason is None:
            self._send(RequestType.ABORT, list(request_ids))

    def call_utility(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        call_id = next(self._call_ids)
        self._pending_calls[call_id] = future
        self._send(RequestType.UTILITY, UtilityCall(call_id=call_id, method=method, args=list(args)))
        return future

    def is_alive(self) -> bool:
        return self.dead_reason is None and self._proc.is_alive()

    # ------------------------------------------------------------------ receiving
    def _receive_loop(self) -> None:
        try:
            while not self._closing.is_set():
                if not self._output.poll(_POLL_MS):
                    if not self._proc.is_alive():
                        self._die(
                            f"the engine core process exited unexpectedly (exit code {self._proc.exitcode})"
                        )
                        return
                    continue
                received = recv_message(self._output, OUTPUT_DECODERS)
                if received.request_type == RequestType.UTILITY_RESULT:
                    self._resolve(received.message)
                elif received.request_type == RequestType.OUTPUTS:
                    outputs: EngineCoreOutputs = received.message
                    self._on_output(outputs)
                    if outputs.engine_error is not None:
                        self._die(f"the engine core failed: {outputs.engine_error}")
                        return
        except zmq.ContextTerminated:
            pass
        except Exception as exc:  # e.g. a wire error: treat the engine as lost, loudly
            logger.exception("engine output receiver failed")
            self._die(f"lost the engine core: {type(exc).__name__}: {exc}")

    def _resolve(self, result: UtilityResult) -> None:
        future = self._pending_calls.pop(result.call_id, None)
        if future is None:
            return
        if result.error is not None:
            future.set_exception(RuntimeError(result.error))
        else:
            future.set_result(result.result)

    def _die(self, reason: str) -> None:
        if self.dead_reason is not None or self._closing.is_set():
            return
        self.dead_reason = reason
        logger.error("%s", reason)
        for future in self._pending_calls.values():
            future.set_exception(EngineDeadError(reason))
        self._pending_calls.clear()
        self._on_output(EngineDead(reason))

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float = 10.0) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        atexit.unregister(self.shutdown)
        if not self.info:  # still starting: nothing to drain, do not wait for the model to load
            self._proc.terminate()
        elif self._proc.is_alive() and self.dead_reason is None:
            try:
                with self._send_lock:
                    send_message(self._input, self._encoder, RequestType.SHUTDOWN, None, timeout=1.0)
            except (zmq.ZMQError, TimeoutError):
                pass
        self._stop_process(timeout)
        if hasattr(self, "_receiver"):
            self._receiver.join(timeout=2)
        self._close_sockets()

    def _stop_process(self, timeout: float = 10.0) -> None:
        self._proc.join(timeout)
        if self._proc.is_alive():
            logger.warning("engine core did not stop in %.0f s; terminating it", timeout)
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        with contextlib.suppress(ValueError):  # still alive after SIGKILL: keep its sentinel
            self._proc.close()

    def _close_sockets(self) -> None:
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        self._ipc_dir.close()
