"""MultiprocExecutor: one worker process per tensor-parallel rank (``workers/worker_proc.py``,
started by name), over the channel of ``ipc/worker_channel.py``.

    engine core ──broadcast ShmRingWriter──▶ rank 0 .. world_size-1   (SchedulerOutput, UtilityCall)
    rank r ──its reply ShmRingWriter──▶ engine core                    (rank 0: ModelRunnerOutput;
                                                                         every rank: UtilityResult)
    ranks ◀──torch.distributed (gloo on CPU, NCCL on CUDA)──▶ ranks

Failure detection: a monitor thread blocks on every worker's process sentinel. When one fires, it
records the death and cancels the broadcast writer and every reply reader, so a step blocked on
either wakes at once and raises WorkerDiedError, as does every later call. A rank whose
execute_model raised reports the traceback and exits; that report becomes the error's message.

Shutdown: close the broadcast ring (workers drain it and exit on RingClosed), wait a grace
period, SIGTERM the stragglers, then SIGKILL; join everything; remove whatever a worker killed
hard left in /dev/shm; remove the private rendezvous directory.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

import msgspec

from core.errors import EngineDeadError, WorkerDiedError
from ipc.config import EngineConfig, check_tp_heads
from ipc.messages import Handshake, ModelRunnerOutput, SchedulerOutput, UtilityCall, UtilityResult
from ipc.process import ChildProcess, start_process
from ipc.serialization import Decoder, Encoder, WireError, check_wire_version
from ipc.shm_ring import RingClosed, RingHandle, ShmRingReader, ShmRingWriter
from ipc.worker_channel import (
    BROADCAST_SLOT_BYTES,
    BROADCAST_SLOTS,
    EXECUTE_CALL_ID,
    MsgKind,
    WorkerProcArgs,
    encode_message,
    remove_ring_files,
    ring_spin_s,
    split_message,
    split_startup,
)
from ipc.zmq_utils import IpcDir

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT_S = 600.0  # loading a large checkpoint on every rank takes minutes
SHUTDOWN_GRACE_S = 5.0  # for workers to leave on their own once the ring is closed
TERM_GRACE_S = 2.0  # after SIGTERM, before SIGKILL
# How long a call that saw its channel close waits for the monitor to name the dead rank.
_DEATH_REPORT_WAIT_S = 1.0
# The worker process's entry point, started by name: the executor imports nothing of workers/.
WORKER_ENTRY_MODULE = "workers.worker_proc"
WORKER_ENTRY_FUNCTION = "worker_main"


class WorkerStartupError(RuntimeError):
    """A worker process failed to start (its error, or how it died, is in the message)."""


@dataclass(slots=True)
class _Worker:
    rank: int
    proc: ChildProcess
    pid: int
    conn: Connection
    reply: ShmRingReader | None = None
    reply_handle: RingHandle | None = None


@dataclass(frozen=True, slots=True)
class _Death:
    rank: int
    pid: int | None
    exitcode: int | None


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is gone (exit status unknown)"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _shutdown_at_exit(ref: weakref.ReferenceType[MultiprocExecutor]) -> Callable[[], None]:
    def hook() -> None:
        executor = ref()
        if executor is not None:
            executor.shutdown()

    return hook


class _PendingOutput:
    """A step broadcast to the workers; ``result()`` waits for rank 0's answer."""

    __slots__ = ("_executor", "output")

    def __init__(self, executor: MultiprocExecutor) -> None:
        self._executor = executor
        self.output: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        while self.output is None:
            self._executor._read_next_output()
        return self.output


class MultiprocExecutor:
    """The Executor protocol over ``tensor_parallel_size`` worker processes (see the module doc)."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        worker_cls: type | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        if config.parallel.pipeline_parallel_size != 1:
            raise ValueError("pipeline parallelism is not supported yet")
        # A bad split fails here, before any process starts.
        check_tp_heads(
            config.model.num_heads, config.model.num_kv_heads, config.parallel.tensor_parallel_size
        )
        self.config = config
        self.world_size = config.parallel.world_size
        self._encoder = Encoder()
        self._output_decoder: Decoder[ModelRunnerOutput] = Decoder(ModelRunnerOutput)
        self._result_decoder: Decoder[UtilityResult] = Decoder(UtilityResult)
        self._call_ids = itertools.count()
        self._workers: list[_Worker] = []
        self._unanswered: collections.deque[_PendingOutput] = collections.deque()
        self._death: _Death | None = None
        self._died = threading.Event()
        self._failure: EngineDeadError | None = None
        self._closing = False
        self._shut_down = False
        self._monitor: threading.Thread | None = None
        self._exit_hook: Callable[[], None] | None = None
        self.exitcodes: list[int | None] = []  # the workers' exit codes, once shut down
        self._failure_callbacks: list[Callable[[EngineDeadError], None]] = []
        self._callback_lock = threading.Lock()
        spin_s = ring_spin_s(config.device.device)
        self._spin_s = spin_s
        self._ring = ShmRingWriter(
            self.world_size,
            n_slots=BROADCAST_SLOTS,
            slot_bytes=BROADCAST_SLOT_BYTES,
            encoder=self._encoder,
            spin_s=spin_s,
        )
        # Private (0700) directory for the torch.distributed file rendezvous: no port to pick and
        # race for, and it goes away with the executor.
        self._ipc_dir = IpcDir(prefix="pagedserve-tp-")
        self._stop_r, self._stop_w = os.pipe()
        try:
            self._start_workers(worker_cls, startup_timeout_s)
        except BaseException:
            # Nothing a half-started worker holds is worth waiting for: SIGTERM at once.
            self._teardown(grace_s=0.0)
            raise
        self._monitor = threading.Thread(target=self._watch_workers, name="worker-monitor", daemon=True)
        self._monitor.start()
        # An owner that never calls shutdown() (a script that just ends) still stops the workers
        # in order at interpreter exit, before the ring's own finalizer closes it under them
        # (which the monitor would report as a worker death). A weak reference: the hook must
        # not keep the executor alive.
        self._exit_hook = _shutdown_at_exit(weakref.ref(self))
        atexit.register(self._exit_hook)
        logger.info(
            "%d worker process(es) ready: pids %s", self.world_size, [w.proc.pid for w in self._workers]
        )

    # ------------------------------------------------------------------ startup

    def _start_workers(self, worker_cls: type | None, timeout_s: float) -> None:
        init_method = "file://" + os.path.join(self._ipc_dir.path, "dist-rendezvous")
        log_level = logger.getEffectiveLevel()  # the level this process logs at, as configured
        for rank in range(self.world_size):
            parent_conn, child_conn = Pipe(duplex=True)
            args = WorkerProcArgs(
                config=self.config,
                rank=rank,
                local_rank=rank,
                world_size=self.world_size,
                dist_init_method=init_method,
                broadcast=self._ring.handle,
                conn_fd=child_conn.fileno(),
                parent_pid=os.getpid(),
                worker_cls=worker_cls,
                log_level=log_level,
            )
            try:
                proc = start_process(
                    f"pagedserve-worker-{rank}",
                    WORKER_ENTRY_MODULE,
                    WORKER_ENTRY_FUNCTION,
                    (args,),
                    pass_fds=(child_conn.fileno(),),
                )
            finally:
                child_conn.close()  # the child has its copy; ours would hide its EOF
            self._workers.append(_Worker(rank, proc, proc.pid, parent_conn))
        self._wait_ready(time.monotonic() + timeout_s, timeout_s)
        self._ring.wait_for_readers(timeout=max(1.0, timeout_s))

    def _wait_ready(self, deadline: float, timeout_s: float) -> None:
        handshake_decoder: Decoder[Handshake] = Decoder(Handshake)
        pending = {w.conn: w for w in self._workers}
        by_sentinel = {w.proc.sentinel: w for w in self._workers}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ranks = sorted(w.rank for w in pending.values())
                raise WorkerStartupError(f"worker rank(s) {ranks} did not start within {timeout_s:.0f} s")
            for ready in wait([*pending, *by_sentinel], timeout=remaining):
                worker = pending.get(ready) or by_sentinel[ready]
                # A dead worker may have said why first (FAILED), so read its pipe before its exit.
                report = self._read_startup(worker) if worker.conn in pending else None
                if report is None:
                    # The process ended without a word (killed, or crashed in native code), or
                    # ended after it said it was ready.
                    worker.proc.join(1.0)
                    raise WorkerStartupError(
                        f"worker rank {worker.rank} (pid {worker.pid}) "
                        f"{_describe_exit(worker.proc.exitcode)} during startup"
                    )
                kind, body = report
                if kind == MsgKind.FAILED:
                    self._raise_startup_failure(worker, body)
                if kind != MsgKind.READY:
                    raise WireError(f"worker rank {worker.rank}: unexpected startup message kind {kind}")
                hello = handshake_decoder.decode([body])
                check_wire_version(hello.wire_schema_version)
                handle = msgspec.convert(hello.info["reply_ring"], RingHandle)
                worker.reply_handle = handle
                worker.reply = ShmRingReader(handle, 0, spin_s=self._spin_s)
                del pending[worker.conn]

    def _read_startup(self, worker: _Worker) -> tuple[int, memoryview] | None:
        try:
            if not worker.conn.poll(0):
                return None
            data = worker.conn.recv_bytes()
        except (EOFError, OSError):
            return None
        try:
            return split_startup(data)
        except WireError as e:
            raise WireError(f"worker rank {worker.rank}: {e}") from None

    def _raise_startup_failure(self, worker: _Worker, body: memoryview) -> None:
        failure = self._result_decoder.decode([body])
        info = failure.result if isinstance(failure.result, dict) else {}
        message = f"tensor-parallel worker rank {worker.rank} failed to start: {info.get('message')}"
        logger.error("%s\n%s", message, failure.error)
        if info.get("type") == "ValueError":
            # A configuration the model cannot run with: the same error type as EngineArgs gives.
            raise ValueError(message)
        raise WorkerStartupError(f"{message}\nworker traceback:\n{failure.error}")

    # ------------------------------------------------------------------ the Executor protocol

    def determine_num_blocks(self) -> int:
        return min(self._call_all("determine_num_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        self._call_all("initialize_cache", num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output).result()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> _PendingOutput:
        """Broadcast the step and return at once; ``result()`` reads rank 0's answer. The workers
        launch a step as soon as it arrives, so the engine may schedule the next one meanwhile."""
        if self._died.is_set() or self._failure is not None:
            raise self._dead_error()
        try:
            self._ring.enqueue_frames(encode_message(self._encoder, MsgKind.EXECUTE, scheduler_output))
        except RingClosed:
            raise self._dead_error() from None
        pending = _PendingOutput(self)
        self._unanswered.append(pending)
        return pending

    def _read_next_output(self) -> None:
        """Read rank 0's next answer into the oldest unanswered step (answers come in order)."""
        if self._failure is not None:
            raise self._failure
        pending = self._unanswered[0]
        reply = self._workers[0].reply
        try:
            frames = reply.dequeue_frames()  # type: ignore[union-attr]
        except RingClosed:
            raise self._dead_error() from None
        kind, body = split_message(frames)
        if kind != MsgKind.OUTPUT:
            # Rank 0 reported an execute_model failure (it exits right after).
            raise self._dead_error(first_report=(0, self._result_decoder.decode(body).error or ""))
        pending.output = self._output_decoder.decode(body)
        self._unanswered.popleft()

    def _drain_outputs(self) -> None:
        while self._unanswered:
            self._read_next_output()

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def register_failure_callback(self, callback: Callable[[EngineDeadError], None]) -> None:
        """Have ``callback(error)`` called, from the monitor thread, as soon as a worker dies, so
        that an idle engine learns of it without waiting for its next step (e.g. to fail
        /health). Called at once if a worker already died."""
        with self._callback_lock:
            if not self._died.is_set():
                self._failure_callbacks.append(callback)
                return
        callback(self._death_error())

    def check_health(self) -> None:
        """Raise WorkerDiedError if a worker has died (cheap: reads a flag)."""
        if self._died.is_set() or self._failure is not None:
            raise self._dead_error()

    def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
        if self._failure is None:
            self._failure = EngineDeadError("the executor was shut down")
        self._teardown()

    # ------------------------------------------------------------------ utility calls

    def _call_all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Run ``worker.method(*args)`` on every rank; their results in rank order."""
        if self._died.is_set() or self._failure is not None:
            raise self._dead_error()
        self._drain_outputs()  # a step's answer ahead of the call's would be read as its result
        call = UtilityCall(call_id=next(self._call_ids), method=method, args=list(args))
        results: list[Any] = []
        errors: list[str] = []
        try:
            self._ring.enqueue_frames(encode_message(self._encoder, MsgKind.UTILITY, call), timeout)
            for worker in self._workers:
                kind, body = split_message(worker.reply.dequeue_frames(timeout))  # type: ignore[union-attr]
                if kind != MsgKind.RESULT:
                    raise WireError(f"worker rank {worker.rank} answered {method} with kind {kind}")
                result = self._result_decoder.decode(body)
                if result.call_id != call.call_id:
                    raise WireError(
                        f"worker rank {worker.rank} answered call {result.call_id}, expected {call.call_id}"
                    )
                if result.error is not None:
                    errors.append(f"worker rank {worker.rank}:\n{result.error}")
                results.append(result.result)
        except RingClosed:
            raise self._dead_error() from None
        if errors:
            raise RuntimeError(f"{method} failed on the workers:\n" + "\n".join(errors))
        return results

    # ------------------------------------------------------------------ failure

    def _watch_workers(self) -> None:
        """Monitor thread: wake on any worker's exit (or on shutdown's stop pipe)."""
        by_sentinel = {w.proc.sentinel: w for w in self._workers}
        ready = wait([*by_sentinel, self._stop_r])
        if self._closing or self._stop_r in ready:
            return
        gone = [by_sentinel[s] for s in ready if s in by_sentinel]
        for worker in gone:
            worker.proc.join(0.5)  # reap it, for the exit code
        # Name the likeliest cause when several went at once: a rank killed by a signal rather
        # than one that exited after a collective with it failed.
        worker = min(gone, key=lambda w: (w.proc.exitcode is None or w.proc.exitcode >= 0, w.rank))
        self._death = _Death(worker.rank, worker.pid, worker.proc.exitcode)
        self._died.set()
        logger.error(
            "worker rank %d (pid %s) %s; the engine cannot continue",
            worker.rank,
            worker.pid,
            _describe_exit(worker.proc.exitcode),
        )
        # Wake whatever the engine thread is blocked on; both cancels are thread-safe.
        self._ring.cancel()
        for w in self._workers:
            if w.reply is not None:
                w.reply.cancel()
        with self._callback_lock:
            callbacks, self._failure_callbacks = self._failure_callbacks, []
        for callback in callbacks:
            try:
                callback(self._death_error())
            except Exception:
                logger.exception("worker failure callback %r raised", callback)

    def _death_error(self) -> WorkerDiedError:
        """What the monitor knows (the reply rings belong to the engine thread: not drained here)."""
        death = self._death
        assert death is not None
        return WorkerDiedError(
            f"worker rank {death.rank} (pid {death.pid}) {_describe_exit(death.exitcode)}; "
            "the engine cannot continue"
        )

    def _dead_error(self, first_report: tuple[int, str] | None = None) -> EngineDeadError:
        """The error for this and every later call, naming the rank that went and every traceback
        the ranks reported (a rank that failed first makes its peers fail in the next collective,
        so the reports together tell the story)."""
        if self._failure is not None:
            return self._failure
        # Give the monitor a moment to name the rank that went (a rank that reported an error is
        # exiting; a closed channel means its writer is gone).
        self._died.wait(_DEATH_REPORT_WAIT_S)
        reports = ([first_report] if first_report else []) + self._drain_error_reports()
        if self._death is not None:
            message = str(self._death_error())
        elif reports:
            message = f"worker rank {reports[0][0]} failed in execute_model; the engine cannot continue"
        else:
            message = "a worker's channel closed unexpectedly; the engine cannot continue"
        for rank, error in sorted(reports):
            message += f"\nworker rank {rank} failed in execute_model:\n{error}"
        self._failure = WorkerDiedError(message)
        return self._failure

    def _drain_error_reports(self) -> list[tuple[int, str]]:
        """Error reports already sitting in the reply rings (they outlive their writers)."""
        reports = []
        for worker in self._workers:
            if worker.reply is None:
                continue
            while True:
                try:
                    frames = worker.reply.dequeue_frames(timeout=0)
                except (RingClosed, TimeoutError, OSError):
                    break
                kind, body = split_message(frames)
                if kind == MsgKind.RESULT:
                    result = self._result_decoder.decode(body)
                    if result.call_id == EXECUTE_CALL_ID and result.error:
                        reports.append((worker.rank, result.error))
        return reports

    # ------------------------------------------------------------------ shutdown

    def _teardown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop every worker and free every resource; safe on a half-built executor."""
        self._closing = True
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(1.0)
        # Wake a call blocked in another thread before the channels go away under it.
        self._ring.cancel()
        for worker in self._workers:
            if worker.reply is not None:
                worker.reply.cancel()
        # Closing the ring is the orderly stop: each worker drains it and exits on RingClosed.
        self._ring.close()
        procs = [w.proc for w in self._workers]
        deadline = time.monotonic() + grace_s
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        stragglers = [p for p in procs if p.is_alive()]
        for proc in stragglers:
            logger.warning("worker %s (pid %s) did not exit; sending SIGTERM", proc.name, proc.pid)
            with contextlib.suppress(OSError):
                proc.terminate()
        deadline = time.monotonic() + TERM_GRACE_S
        for proc in stragglers:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in stragglers:
            if proc.is_alive():
                logger.warning("worker %s (pid %s) ignored SIGTERM; sending SIGKILL", proc.name, proc.pid)
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.join()
        self.exitcodes = [p.exitcode for p in procs]
        for worker in self._workers:
            if worker.reply is not None:
                worker.reply.close()
            if worker.reply_handle is not None and remove_ring_files(worker.reply_handle):
                # The worker could not clean up after itself (it was killed): we did.
                logger.info("removed the reply ring that worker rank %d left behind", worker.rank)
            worker.conn.close()
            with contextlib.suppress(ValueError):
                worker.proc.close()
        self._ipc_dir.close()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stop_r = self._stop_w = -1
