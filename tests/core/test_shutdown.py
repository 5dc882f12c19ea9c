"""However the frontend process ends, no engine process and no shared memory outlive it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.checkpoints import save_tiny_model, tiny_config

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from frontend.llm import LLM

    if __name__ == "__main__":
        # A process started in the background by a shell without job control inherits SIGINT
        # ignored, and Python keeps it so: restore Ctrl-C, which is what the SIGINT case tests.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        llm = LLM({model!r}, skip_tokenizer_init=True, tensor_parallel_size=2, max_model_len=128,
                  num_gpu_blocks_override=64)
        llm.generate([[1, 2, 3]], use_tqdm=False)
        pid = llm.engine.client._proc.pid
        kids = open(f"/proc/{{pid}}/task/{{pid}}/children").read().split()
        print("PIDS", pid, *kids, flush=True)
        time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return save_tiny_model(tmp_path_factory.mktemp("tiny-shutdown"), config).path


def _start_frontend(tmp_path: Path, model: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """The frontend script running, with the pids of its engine core and two workers."""
    script = tmp_path / "frontend.py"
    script.write_text(SCRIPT.format(root=str(ROOT), model=str(model)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("PIDS"):
            pids = [int(p) for p in line.split()[1:]]
            break
        if not line and proc.poll() is not None:
            break
    return proc, pids


def _assert_all_gone(pids: list[int], shm_before: set[str]) -> None:
    # After SIGKILL / SIGTERM the engine core stops on its own (parent-death signal): it joins
    # its socket threads (up to 5 s each) and then stops the workers, which on the 2-core VM
    # has run past 20 s. What is checked is that nothing is left, not how fast.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        any(_alive(p) for p in pids) or set(os.listdir("/dev/shm")) - shm_before
    ):
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)]
    assert set(os.listdir("/dev/shm")) - shm_before == set()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_no_engine_process_outlives_the_frontend(
    tiny_model: Path, tmp_path: Path, how: signal.Signals
) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    proc, pids = _start_frontend(tmp_path, tiny_model)
    try:
        assert len(pids) == 3, "engine core and two workers"
        os.kill(proc.pid, how)
        # Generous: an orderly stop (SIGINT) drains the engine and its workers, which on a
        # loaded two-core CI machine has taken over 30 s.
        proc.wait(timeout=90)
        _assert_all_gone(pids, shm_before)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(180)
def test_a_sigterm_storm_still_ends_in_an_orderly_exit(tiny_model: Path, tmp_path: Path) -> None:
    """Many SIGTERMs in a row (a supervisor retrying, the parent-death signal on top) still end in
    an orderly exit. A handler that took a lock deadlocked here when a second signal arrived while
    the first handler held it: the engine and its workers then lived on forever."""
    shm_before = set(os.listdir("/dev/shm"))
    proc, pids = _start_frontend(tmp_path, tiny_model)
    try:
        assert len(pids) == 3, "engine core and two workers"
        # A steady stream over the whole shutdown, so that signals land inside whatever the engine's
        # main thread and its handler are doing then.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _alive(pids[0]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[0], signal.SIGTERM)
            time.sleep(0.0002)
        _assert_all_gone(pids, shm_before)
    finally:
        proc.kill()
        proc.wait(timeout=30)


FORGETFUL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from frontend.llm import LLM

    if __name__ == "__main__":
        llm = LLM({model!r}, engine_process=False, skip_tokenizer_init=True, tensor_parallel_size=2,
                  max_model_len=128, num_gpu_blocks_override=64)
        llm.generate([[1, 2, 3]], use_tqdm=False)
        print("PIDS", *llm.engine.core.executor.worker_pids, flush=True)
        # no llm.shutdown(): the script just ends
    """
)


@pytest.mark.timeout(120)
def test_script_that_never_shuts_down_stops_its_workers_quietly(tiny_model: Path, tmp_path: Path) -> None:
    """An in-process engine whose owner never calls shutdown() still stops its worker processes
    in order at interpreter exit: exit status 0, no false "worker died" error, nothing left."""
    shm_before = set(os.listdir("/dev/shm"))
    script = tmp_path / "forgetful.py"
    script.write_text(FORGETFUL_SCRIPT.format(root=str(ROOT), model=str(tiny_model)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    pids = [int(p) for line in done.stdout.splitlines() if line.startswith("PIDS") for p in line.split()[1:]]
    assert len(pids) == 2
    assert "cannot continue" not in done.stderr
    assert not [p for p in pids if _alive(p)]
    assert set(os.listdir("/dev/shm")) - shm_before == set()


@pytest.mark.timeout(60)
def test_engine_core_whose_client_died_before_it_started_exits_at_once() -> None:
    """A client that died before the engine could ask for the parent-death signal sends none: the
    engine compares its parent with the client pid it was given and exits before doing anything
    (the config is never read, so None stands in for it)."""
    from core.engine_core_proc import run_engine_core

    dead_client = 1  # init adopts the orphans: a parent pid that is not the engine's parent
    proc = multiprocessing.get_context("spawn").Process(
        target=run_engine_core, args=(None, "ipc:///nonexistent-in", "ipc:///nonexistent-out", dead_client)
    )
    proc.start()
    proc.join(timeout=30)
    assert proc.exitcode == 0
