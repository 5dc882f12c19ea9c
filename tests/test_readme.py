"""The README's code runs as printed: every block, and the Python ones in every way users run code.

A block's ``# -> text`` lines say what it prints. Bash blocks run line by line; a line that
starts a server runs in the background until /health answers (on a free port instead of 8000), and
``make test`` is checked with ``make -n`` (this suite is what it runs).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import free_port
from tests.user_scripts import REPO, readme_blocks, run_user_code

PYTHON_BLOCKS = readme_blocks("python")
OFFLINE = next(b for b in PYTHON_BLOCKS if "LLM(model=" in b and "AsyncLLM" not in b)
ASYNC = next(b for b in PYTHON_BLOCKS if "AsyncLLM" in b)
_SERVER_START = re.compile(r"^(make serve|python -m frontend|pagedserve serve)\b")


def expected_lines(block: str) -> list[str]:
    return [line.split("# ->", 1)[1].strip() for line in block.splitlines() if "# ->" in line]


def shows(expected: str, output: str) -> bool:
    """Whether ``output`` holds ``expected``, where "..." in it stands for any text."""
    position = 0
    for fragment in filter(None, (part.strip() for part in expected.split("..."))):
        position = output.find(fragment, position)
        if position < 0:
            return False
        position += len(fragment)
    return True


def test_the_readme_shows_python_and_states_what_it_prints() -> None:
    assert len(PYTHON_BLOCKS) >= 2
    assert all(expected_lines(block) for block in (OFFLINE, ASYNC))


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("block", "mode"),
    [(OFFLINE, mode) for mode in ("file", "stdin", "command", "interactive", "notebook")]
    + [(ASYNC, mode) for mode in ("file", "stdin", "command")],
    ids=[f"offline-{m}" for m in ("file", "stdin", "command", "interactive", "notebook")]
    + [f"async-{m}" for m in ("file", "stdin", "command")],
)
def test_readme_python_runs_without_a_main_guard(block: str, mode: str, tmp_path: Path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    done, left = run_user_code(block, mode, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in expected_lines(block):
        assert shows(line, done.stdout), (line, done.stdout[-2000:])
    assert left == []
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def test_every_other_python_block_runs(tmp_path: Path) -> None:
    for block in PYTHON_BLOCKS:
        if block in (OFFLINE, ASYNC):
            continue
        done, left = run_user_code(block, "file", tmp_path)
        assert done.returncode == 0, (block, done.stderr[-3000:])
        for line in expected_lines(block):
            assert shows(line, done.stdout), (line, done.stdout[-2000:])
        assert left == []


def _commands(block: str) -> list[str]:
    """Shell commands of a bash block: continuation lines joined, trailing comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def _start_server(command: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    if command.startswith("make serve"):
        command += f" SERVE_ARGS='--port {port}'"
    else:
        command = command.replace("--port 8000", f"--port {port}")
        if "--port" not in command:
            command += f" --port {port}"
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            shell=True,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"the server was not healthy in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("index", range(len(readme_blocks("bash"))))
def test_readme_bash_block_runs(index: int, tmp_path: Path) -> None:
    block = readme_blocks("bash")[index]
    port = free_port()
    servers: list[subprocess.Popen[bytes]] = []
    output = ""
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    try:
        for command in _commands(block):
            if _SERVER_START.match(command):
                log = tmp_path / f"server{len(servers)}.log"
                servers.append(_start_server(command, port, log))
                _wait_healthy(servers[-1], port, log)
                continue
            if command.startswith("make test"):
                command = command.replace("make test", "make -n test", 1)
            command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(
                "localhost:8000", f"localhost:{port}"
            )
            done = subprocess.run(
                command, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
            output += done.stdout
    finally:
        for server in servers:
            _stop(server)
    for line in expected_lines(block):
        assert shows(line, output), (line, output[-2000:])
