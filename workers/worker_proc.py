"""The worker process: one per rank, started by core.mp_executor.MultiprocExecutor through
:func:`worker_main`. What it exchanges with the executor, and how, is ipc/worker_channel.py.

A failure in ``execute_model`` leaves this rank's persistent batch, and possibly a collective, half
done, so it is fatal: the rank reports the traceback on its reply ring and exits with code 1. The
executor turns that report (or, if a peer of the failing rank notices first, the exit) into
WorkerDiedError. A failing utility call is answered with its error and the worker carries on.

The process exits by itself when the executor closes the broadcast ring (the orderly way), when
the executor's process dies (the ring reader sees its writer go; the startup pipe reads EOF; the
parent pid changes), and on SIGTERM. SIGINT is ignored: Ctrl-C reaches the whole process group,
and the parent owns the orderly shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import msgspec

from ipc.logging_setup import setup_logging
from ipc.messages import WIRE_SCHEMA_VERSION, Handshake, SchedulerOutput, UtilityCall, UtilityResult
from ipc.process import use_thread_locks_for_progress_bars
from ipc.serialization import Decoder, Encoder, WireError
from ipc.shm_ring import RingClosed, RingHandle, ShmRingReader, ShmRingWriter
from ipc.worker_channel import (
    EXECUTE_CALL_ID,
    REPLY_RING_SLOT_BYTES,
    REPLY_RING_SLOTS,
    STARTUP_CALL_ID,
    MsgKind,
    WorkerProcArgs,
    encode_message,
    encode_startup,
    remove_ring_files,
    ring_spin_s,
    split_message,
)

if TYPE_CHECKING:
    from workers.distributed import ParallelGroups

logger = logging.getLogger(__name__)

# After the parent dies, how long the main thread gets to clean up after itself (it may be
# inside a collective that only returns when a peer's connection drops) before a hard exit.
_PARENT_DEATH_GRACE_S = 5.0
_PARENT_POLL_S = 1.0


class _Stop(BaseException):
    """Raised by the SIGTERM handler: leave the loop and clean up (a BaseException, so that the
    ``except Exception`` around execute_model does not report it as a model failure)."""


class WorkerProc:
    def __init__(self, args: WorkerProcArgs) -> None:
        self.args = args
        self.conn = Connection(args.conn_fd)
        self.rank = args.rank
        self.worker: Any = None
        self.ring: ShmRingReader | None = None
        self.reply: ShmRingWriter | None = None
        self.reply_handle: RingHandle | None = None
        self.groups: ParallelGroups | None = None  # once this rank joined its process groups
        self._encoder = Encoder()
        self._exiting = threading.Event()
        self._launch_first = args.config.device.device == "cuda"

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        threading.Thread(target=self._watch_parent, name="parent-watch", daemon=True).start()
        try:
            try:
                self._start()
            except _Stop:
                return 0
            except BaseException as e:
                logger.exception("worker rank %d failed to start", self.rank)
                self._send_startup(
                    MsgKind.FAILED,
                    UtilityResult(
                        call_id=STARTUP_CALL_ID,
                        result={"type": type(e).__name__, "message": str(e)},
                        error=traceback.format_exc(),
                    ),
                )
                return 1
            self._send_startup(
                MsgKind.READY,
                Handshake(
                    wire_schema_version=WIRE_SCHEMA_VERSION,
                    role="worker",
                    pid=os.getpid(),
                    info={"rank": self.rank, "reply_ring": self.reply_handle},
                ),
            )
            try:
                return self._loop()
            except _Stop:
                logger.info("worker rank %d: SIGTERM, exiting", self.rank)
                return 0
        finally:
            # Already on the way out: a SIGTERM now (the parent watch sends one too) must not
            # break off the cleanup half way.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._exiting.set()
            self._cleanup()

    def _start(self) -> None:
        # torch and the model code load here, once run() handles SIGTERM, not at import.
        import torch

        from workers.distributed import init_distributed
        from workers.worker import Worker, torch_dtype

        args = self.args
        config = args.config
        if config.device.device == "cuda":
            torch.cuda.set_device(args.local_rank)
        # Attach first: the executor's wait_for_readers counts this rank in once the FIFO is open.
        self.ring = ShmRingReader(
            args.broadcast, self.rank, decoder=Decoder(Any), spin_s=ring_spin_s(config.device.device)
        )
        device = (
            torch.device("cuda", args.local_rank) if config.device.device == "cuda" else torch.device("cpu")
        )
        self.groups = init_distributed(
            rank=self.rank,
            world_size=args.world_size,
            device=device,
            init_method=args.dist_init_method,
            timeout_s=args.dist_timeout_s,
            custom_all_reduce_dtype=(
                None if config.parallel.disable_custom_all_reduce else torch_dtype(config.model.dtype)
            ),
        )
        worker_cls = args.worker_cls or Worker
        self.worker = worker_cls(config, rank=self.rank, tp=self.groups.tp)
        self.worker.load_model()
        self.reply = ShmRingWriter(
            1,
            n_slots=REPLY_RING_SLOTS,
            slot_bytes=REPLY_RING_SLOT_BYTES,
            encoder=self._encoder,
            spin_s=ring_spin_s(config.device.device),
        )
        self.reply_handle = self.reply.handle

    def _loop(self) -> int:
        """Run what the ring brings, in order. A step is launched as soon as it arrives and
        answered once its tokens are on the host; when the next step arrives first (the engine
        schedules step N+1 while N runs), N+1 is launched before N is answered, so the device
        never waits for the answer's round trip. Answers still leave in step order."""
        assert self.ring is not None and self.reply is not None
        ring, worker, rank = self.ring, self.worker, self.rank
        so_decoder: Decoder[SchedulerOutput] = Decoder(SchedulerOutput)
        call_decoder: Decoder[UtilityCall] = Decoder(UtilityCall)
        pending: Any = None  # the launched step not answered yet (a workers.model_runner.PendingStep)
        while True:
            if pending is not None and not self._wait_step_or_message(pending):
                if not self._answer(pending):
                    return 1
                pending = None
                continue
            try:
                frames = ring.dequeue_frames()
            except RingClosed as e:
                logger.info("worker rank %d: %s; exiting", rank, e)
                return 0
            kind, body = split_message(frames)
            if kind == MsgKind.EXECUTE:
                try:
                    step = worker.execute_model_async(so_decoder.decode(body))
                except Exception:
                    self._report_failure()
                    return 1
                if pending is not None and not self._answer(pending):
                    return 1
                pending = step
            elif kind == MsgKind.UTILITY:
                if pending is not None:  # answers leave in the order the calls came
                    if not self._answer(pending):
                        return 1
                    pending = None
                call = call_decoder.decode(body)
                result = self._run_utility(call)
                self.reply.enqueue_frames(encode_message(self._encoder, MsgKind.RESULT, result))
                if call.method == "shutdown" and result.error is None:
                    return 0
            else:
                raise WireError(f"worker rank {rank}: unknown message kind {kind} on the broadcast ring")

    def _wait_step_or_message(self, pending: Any) -> bool:
        """Spin until the ring holds a message (True) or the step's tokens are ready (False).
        The host has nothing else to do meanwhile; a wake-up would cost more than the spin.

        When both hold: on CUDA the next step is launched first (the GPU would idle for the
        answer's few microseconds otherwise); on CPU the launch *is* the forward pass, so the
        finished step is answered first rather than one whole step late."""
        ring = self.ring
        assert ring is not None
        if not self._launch_first and pending.done():
            return False
        while True:
            if ring.poll():
                return True
            if pending.done():
                return False
            os.sched_yield()

    def _answer(self, pending: Any) -> bool:
        """Wait for a launched step and, on rank 0, send its output. False if it failed (fatal)."""
        try:
            output = pending.result()
        except Exception:
            self._report_failure()
            return False
        if self.rank == 0:
            assert self.reply is not None
            self.reply.enqueue_frames(encode_message(self._encoder, MsgKind.OUTPUT, output))
        return True

    def _report_failure(self) -> None:
        """execute_model failed: fatal (see the module docstring). Report on the reply ring."""
        logger.exception("worker rank %d: execute_model failed", self.rank)
        error = UtilityResult(call_id=EXECUTE_CALL_ID, error=traceback.format_exc())
        assert self.reply is not None
        with contextlib.suppress(RingClosed, TimeoutError):
            self.reply.enqueue_frames(encode_message(self._encoder, MsgKind.RESULT, error), timeout=5.0)

    def _run_utility(self, call: UtilityCall) -> UtilityResult:
        try:
            if call.method == "shutdown":
                return UtilityResult(call_id=call.call_id)
            method = None if call.method.startswith("_") else getattr(self.worker, call.method, None)
            if not callable(method):
                raise AttributeError(f"the worker has no method {call.method!r}")
            return UtilityResult(call_id=call.call_id, result=method(*call.args))
        except Exception:
            logger.exception("worker rank %d: utility call %s failed", self.rank, call.method)
            return UtilityResult(call_id=call.call_id, error=traceback.format_exc())

    def _send_startup(self, kind: MsgKind, msg: msgspec.Struct) -> None:
        data = encode_startup(self._encoder, kind, msg)
        try:
            self.conn.send_bytes(data)
        except OSError:
            logger.warning("worker rank %d: the executor is gone; could not report %s", self.rank, kind.name)

    def _cleanup(self) -> None:
        # The reply ring first: it is the one thing here that would outlive us (in /dev/shm).
        if self.reply is not None:
            with contextlib.suppress(Exception):
                self.reply.close()
        if self.ring is not None:
            with contextlib.suppress(Exception):
                self.ring.close()
        if self.worker is not None:
            with contextlib.suppress(Exception):
                self.worker.shutdown()
        if self.groups is not None:
            self.groups.destroy()

    # ------------------------------------------------------------------ signals and the parent

    def _on_sigterm(self, signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; let the cleanup finish
        raise _Stop()

    def _watch_parent(self) -> None:
        """Exit when the executor's process dies, wherever the main thread is blocked."""
        conn, parent_pid = self.conn, self.args.parent_pid
        while not self._exiting.is_set():
            try:
                if conn.poll(_PARENT_POLL_S):
                    conn.recv_bytes()  # the executor sends nothing: only EOF can arrive
            except (EOFError, OSError):
                break
            if os.getppid() != parent_pid:
                break
        if self._exiting.is_set():
            return
        logger.warning("worker rank %d: the executor process %d is gone; exiting", self.rank, parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread cleans up, unless stuck in C code
        deadline = time.monotonic() + _PARENT_DEATH_GRACE_S
        while not self._exiting.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._exiting.is_set():
            return
        handle = self.reply_handle
        if handle is not None:
            remove_ring_files(handle)
        os._exit(1)


def worker_main(args: WorkerProcArgs) -> None:
    """The process entry point (started by ipc.process.start_process); exits with the loop's code."""
    setup_logging(f"worker rank {args.rank}", args.log_level)
    use_thread_locks_for_progress_bars()
    raise SystemExit(WorkerProc(args).run())
