"""The engine-core process: EngineCore behind two ZeroMQ sockets.

    input thread:  recv + decode -> input queue
    main thread:   drain inputs -> step (schedule -> execute -> update) -> output queue
    output thread: output queue -> encode + send

The socket threads release the GIL in ZeroMQ and overlap (de)serialisation with the step. The
process exits when told to (SHUTDOWN), on SIGTERM/SIGINT, when its parent dies, or after a fatal
error, which it reports to the client first so every request there can fail at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import threading
import time
import traceback
from typing import Any

import zmq

from core.engine_core import EngineCore
from core.errors import EngineDeadError
from ipc.config import EngineConfig
from ipc.logging_setup import setup_logging
from ipc.messages import (
    WIRE_SCHEMA_VERSION,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
    Handshake,
    UtilityCall,
    UtilityResult,
)
from ipc.process import use_thread_locks_for_progress_bars
from ipc.serialization import Decoder, Encoder
from ipc.zmq_utils import RequestType, make_socket, recv_message, send_message

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# How long an idle engine blocks on its input queue before re-checking for shutdown.
_IDLE_POLL_S = 0.5

INPUT_DECODERS = {
    RequestType.ADD: Decoder(EngineCoreRequest),
    RequestType.ABORT: Decoder(list[str]),
    RequestType.UTILITY: Decoder(UtilityCall),
    RequestType.SHUTDOWN: Decoder(Any),
}
# An internal input (never on the wire): a worker died; the message says which and how.
_FAILED = "failed"
# What the client may call through UTILITY messages.
UTILITY_METHODS = frozenset({"reset_prefix_cache", "get_stats", "ping"})


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the parent dies, so an engine never outlives its client."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the parent-pid watch in the loop still catches it
        pass


class EngineCoreProc:
    def __init__(self, config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self.ctx = zmq.Context(io_threads=1)
        self.input_addr, self.output_addr = input_addr, output_addr
        self.inputs: queue.Queue[tuple[RequestType, Any]] = queue.Queue()
        self.outputs: queue.Queue[tuple[RequestType, Any] | None] = queue.Queue()
        self.stop = threading.Event()
        # Set by the SIGTERM handler. A plain attribute, not ``stop.set()``: a handler runs between
        # any two bytecodes of the main thread, and one that takes the Event's (non-reentrant) lock
        # while the main thread, or an earlier handler, holds it deadlocks the process for good.
        # Several SIGTERMs within milliseconds are normal: when a multi-threaded parent is killed,
        # the kernel re-parents us to each of its dying threads in turn, and every re-parenting
        # delivers the parent-death signal again (1 to 3 of them measured after a SIGKILL).
        self.terminated = False
        self.config = config
        self.engine: EngineCore | None = None

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        out_sock = make_socket(self.ctx, zmq.PUSH, self.output_addr, bind=False)
        encoder = Encoder()
        try:
            self.engine = EngineCore(self.config)
        except BaseException as exc:  # startup failure: say why, then exit
            logger.exception("engine core failed to start")
            info = {"error": f"{type(exc).__name__}: {exc}"}
            send_message(out_sock, encoder, RequestType.HANDSHAKE, self._handshake(info))
            out_sock.close(linger=2000)
            self.ctx.term()
            return 1
        send_message(out_sock, encoder, RequestType.HANDSHAKE, self._handshake(self._facts()))
        # A worker dying while the engine idles must surface now (e.g. /health), not at the next step.
        register = getattr(self.engine.executor, "register_failure_callback", None)
        if register is not None:
            register(lambda error: self.inputs.put((_FAILED, str(error))))
        threads = [
            threading.Thread(target=self._input_loop, name="engine-input", daemon=True),
            threading.Thread(
                target=self._output_loop, args=(out_sock, encoder), name="engine-output", daemon=True
            ),
        ]
        for t in threads:
            t.start()
        code = 0
        try:
            self._busy_loop()
        except BaseException as exc:
            logger.exception("engine core died")
            message = f"{type(exc).__name__}: {exc}"
            self.outputs.put(
                (RequestType.OUTPUTS, EngineCoreOutputs(engine_error=message, timestamp=time.time()))
            )
            code = 1
        finally:
            self.stop.set()
            self.outputs.put(None)
            for t in threads:  # sockets belong to their threads: let them close them
                t.join(timeout=5)
            self.engine.shutdown()
            self.ctx.destroy(linger=1000)
        return code

    def on_sigterm(self, signum: int, frame: object) -> None:
        # Lock-free (see ``terminated``); the busy loop sees it within one idle poll or step.
        self.terminated = True

    def _handshake(self, info: dict[str, Any]) -> Handshake:
        return Handshake(
            wire_schema_version=WIRE_SCHEMA_VERSION, role="engine_core", pid=os.getpid(), info=info
        )

    def _facts(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "num_gpu_blocks": engine.num_blocks,
            "block_size": self.config.cache.block_size,
            "kv_capacity_tokens": engine.kv_capacity_tokens,
            "max_model_len": self.config.scheduler.max_model_len,
        }

    # ------------------------------------------------------------------ threads
    def _input_loop(self) -> None:
        sock = make_socket(self.ctx, zmq.PULL, self.input_addr, bind=False)
        try:
            while not self.stop.is_set():
                if not sock.poll(200):
                    continue
                received = recv_message(sock, INPUT_DECODERS)
                self.inputs.put((received.request_type, received.message))
        except zmq.ContextTerminated:
            pass
        except Exception:  # a malformed message must not kill the engine silently
            if self.stop.is_set():
                return
            logger.exception("input thread failed")
            self.inputs.put((RequestType.SHUTDOWN, "input thread failed"))
        finally:
            sock.close(linger=0)

    def _output_loop(self, sock: zmq.Socket, encoder: Encoder) -> None:
        while True:
            item = self.outputs.get()
            if item is None:
                break
            request_type, message = item
            send_message(sock, encoder, request_type, message)
        sock.close(linger=2000)

    # ------------------------------------------------------------------ main loop
    def _busy_loop(self) -> None:
        engine = self.engine
        was_busy = False
        while not self.terminated:
            if not engine.has_unfinished_requests():
                if was_busy:  # one last stats message so gauges return to idle
                    self.outputs.put((RequestType.OUTPUTS, engine.step()))
                    was_busy = False
                if os.getppid() != self.parent_pid:
                    logger.warning("parent process died; engine core exits")
                    return
                try:
                    item = self.inputs.get(timeout=_IDLE_POLL_S)
                except queue.Empty:
                    continue
                if not self._handle(*item):
                    return
            while True:  # drain without blocking
                try:
                    item = self.inputs.get_nowait()
                except queue.Empty:
                    break
                if not self._handle(*item):
                    return
            if engine.has_unfinished_requests():
                was_busy = True
                outputs = engine.step()
                if outputs.outputs or outputs.scheduler_stats is not None:
                    self.outputs.put((RequestType.OUTPUTS, outputs))

    def _handle(self, request_type: RequestType, message: Any) -> bool:
        """Apply one input; False means shut down."""
        engine = self.engine
        if request_type == RequestType.ADD:
            try:
                engine.add_request(message)
            except ValueError as exc:
                refused = EngineCoreOutput(
                    request_id=message.request_id,
                    new_token_ids=[],
                    finish_reason=FinishReason.ERROR,
                    error=str(exc),
                )
                self.outputs.put(
                    (RequestType.OUTPUTS, EngineCoreOutputs(outputs=[refused], timestamp=time.time()))
                )
        elif request_type == RequestType.ABORT:
            engine.abort_requests(message)
        elif request_type == RequestType.UTILITY:
            self.outputs.put((RequestType.UTILITY_RESULT, self._utility(message)))
        elif request_type == RequestType.SHUTDOWN:
            return False
        elif request_type == _FAILED:
            raise EngineDeadError(message)
        return True

    def _utility(self, call: UtilityCall) -> UtilityResult:
        if call.method not in UTILITY_METHODS:
            return UtilityResult(call_id=call.call_id, error=f"unknown utility method {call.method!r}")
        try:
            if call.method == "reset_prefix_cache":
                result: Any = self.engine.reset_prefix_cache()
            elif call.method == "get_stats":
                result = {
                    "num_unfinished": self.engine.scheduler.num_unfinished,
                    "kv_cache_usage": self.engine.kv_cache.usage,
                }
            else:
                result = "pong"
            return UtilityResult(call_id=call.call_id, result=result)
        except Exception as exc:
            return UtilityResult(
                call_id=call.call_id, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            )


def run_engine_core(
    config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int, log_level: int = logging.INFO
) -> None:
    """Entry point of the engine-core process (started by ipc.process.start_process); ``parent_pid`` is
    the client's pid, passed in because a parent that died before ``_die_with_parent`` ran sends no
    signal, and ``os.getppid()`` read here would already name the process that adopted us."""
    setup_logging("engine", log_level)
    logger.info("engine core process %d started", os.getpid())  # the start-up timeline's first mark
    _die_with_parent()
    if os.getppid() != parent_pid:
        logger.warning("the client process %d died before the engine core started; exiting", parent_pid)
        return
    use_thread_locks_for_progress_bars()
    proc = EngineCoreProc(config, input_addr, output_addr, parent_pid)

    signal.signal(signal.SIGTERM, proc.on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the client decides; Ctrl-C goes to the frontend
    raise SystemExit(proc.run())
