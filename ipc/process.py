"""Starting the engine's processes (the engine core, one worker per rank) and set-up they share.

A child is a fresh interpreter started as ``python -c BOOTSTRAP ROLE``. It reads its start-up
payload, pickled, from a pipe on its stdin: first the parent's ``sys.path`` (so it imports what
the parent imports, an uninstalled checkout or a test directory included), then the entry
point's module and function and their arguments. It imports that module and calls the function.

Why not multiprocessing's "spawn": spawn re-runs the parent's ``__main__`` in the child, so a
plain script without an ``if __name__ == "__main__":`` guard starts a second engine from inside
the first child and fails; and a notebook or ``python -c`` parent leaves nothing sensible to
re-run. A child started here never looks at the parent's ``__main__``. "fork" is out: the parent
may already hold CUDA or torch's thread pools.

What spawn gave that is kept: the child shares the parent's multiprocessing resource tracker (one
tracker per process tree, which unlinks shared memory that a killed process leaves), and the
parent holds a sentinel, a pipe whose other end only the child holds, that turns readable when
the child exits (for ``multiprocessing.connection.wait``). File descriptors reach the child only
through ``pass_fds``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
from multiprocessing import resource_tracker
from typing import IO, Any

# The child's program. It sets sys.path before importing anything of the project.
BOOTSTRAP = (
    "import sys, pickle; stream = sys.stdin.buffer; sys.path[:] = pickle.load(stream); "
    "from ipc.process import run_child; run_child(stream)"
)


class ChildProcess:
    """A started child: the part of ``multiprocessing.Process``'s interface the engine uses."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str, sentinel: int) -> None:
        self._popen = popen
        self.name = name
        self.pid = popen.pid
        self.sentinel = sentinel  # readable once the child has exited

    @property
    def exitcode(self) -> int | None:
        """None while running; -N when killed by signal N (as multiprocessing reports it)."""
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signum)

    def close(self) -> None:
        """Release the sentinel (the process must have exited)."""
        if self._popen.poll() is None:
            raise ValueError(f"{self.name} (pid {self.pid}) is still running")
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def start_process(
    name: str, module: str, function: str, args: tuple[Any, ...], *, pass_fds: tuple[int, ...] = ()
) -> ChildProcess:
    """Start ``module.function(*args)`` in a new interpreter named ``name`` (its argv[1], seen in
    ``ps``). ``args`` are pickled; file descriptors they name must be in ``pass_fds``."""
    tracker_fd = resource_tracker.getfd()  # starts the tracker if this process has none yet
    sentinel_r, sentinel_w = os.pipe()
    try:
        popen = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, name],
            stdin=subprocess.PIPE,
            pass_fds=(*pass_fds, tracker_fd, sentinel_w),
            close_fds=True,
        )
    except BaseException:
        os.close(sentinel_r)
        raise
    finally:
        os.close(sentinel_w)  # the child's copy alone keeps the sentinel unreadable
    child = ChildProcess(popen, name, sentinel_r)
    payload = (module, function, args, tracker_fd)
    try:
        _send_payload(popen.stdin, pickle.dumps(sys.path), pickle.dumps(payload))
    except BrokenPipeError:
        child.join(5.0)
        raise RuntimeError(
            f"the {name} process (pid {child.pid}) exited before it read its start-up arguments "
            f"(exit code {child.exitcode})"
        ) from None
    return child


def _send_payload(stdin: IO[bytes] | None, *parts: bytes) -> None:
    assert stdin is not None
    with stdin:
        for part in parts:
            stdin.write(part)


def run_child(stream: IO[bytes]) -> None:
    """The child's side of :func:`start_process` (called by BOOTSTRAP)."""
    module, function, args, tracker_fd = pickle.load(stream)
    # The start-up pipe is done with; stdin becomes /dev/null, as in a daemon.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fd 0 lives as long as the process
    # Share the parent's tracker instead of starting one per process (what spawn does too).
    resource_tracker._resource_tracker._fd = tracker_fd
    entry = getattr(importlib.import_module(module), function)
    entry(*args)


def use_thread_locks_for_progress_bars() -> None:
    """tqdm's default write lock is a multiprocessing RLock: a named semaphore in /dev/shm that a
    SIGKILLed process can never unlink. Engine processes draw their bars from one thread each, so
    a thread lock is enough and leaves nothing behind."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
