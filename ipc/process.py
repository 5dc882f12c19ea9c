"""Set-up shared by every process the engine spawns."""

from __future__ import annotations

import threading


def use_thread_locks_for_progress_bars() -> None:
    """tqdm's default write lock is a multiprocessing RLock: a named semaphore in /dev/shm that a
    SIGKILLed process can never unlink. Engine processes draw their bars from one thread each, so
    a thread lock is enough and leaves nothing behind."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
