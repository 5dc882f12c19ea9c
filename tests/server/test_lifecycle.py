"""The command line, startup report, and shutdown: SIGTERM and SIGINT stop the server and the
engine, leaving no process behind, even with a stream in flight."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from frontend.cli import build_parser, human_readable_int, main, parse_args
from tests.server.conftest import (
    REPO,
    ServerProcess,
    descendants,
    error_of,
    free_port,
    is_running,
    parse_sse,
    tiny_server_args,
)

VLLM_FLAGS = (
    "--host",
    "--port",
    "--served-model-name",
    "--api-key",
    "--max-model-len",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--gpu-memory-utilization",
    "--dtype",
    "--tensor-parallel-size",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--block-size",
    "--seed",
    "--device",
    "--load-format",
    "--tokenizer",
    "--chat-template",
    "--enforce-eager",
    "--disable-log-requests",
    "--uvicorn-log-level",
    "--num-gpu-blocks-override",
    "--kv-cache-memory-bytes",
    "--model",
)


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    text = build_parser().format_help()
    for flag in VLLM_FLAGS:
        assert flag in text, flag
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0 and "--max-model-len" in capsys.readouterr().out
    assert main(["bogus"]) == 2


def test_flags_become_frozen_configs() -> None:
    engine, server = parse_args(
        [
            "my-model",
            "--served-model-name", "a", "b",
            "--max-model-len", "4k",
            "--max-num-seqs", "7",
            "--max-num-batched-tokens", "2048",
            "--gpu-memory-utilization", "0.5",
            "--dtype", "float16",
            "-tp", "2",
            "--no-enable-prefix-caching",
            "--block-size", "32",
            "--seed", "3",
            "--device", "cpu",
            "--load-format", "dummy",
            "--tokenizer", "/tok",
            "--chat-template", "{{ x }}",
            "--enforce-eager",
            "--num-gpu-blocks-override", "99",
            "--kv-cache-memory-bytes", "1G",
            "--host", "127.0.0.1",
            "--port", "9000",
            "--api-key", "k1", "k2",
            "--disable-log-requests",
            "--uvicorn-log-level", "debug",
        ],
        environ={"VLLM_API_KEY": "ignored-when-a-flag-is-given"},
    )  # fmt: skip
    assert (engine.model, engine.served_model_name, engine.max_model_len) == ("my-model", "a", 4000)
    assert (engine.max_num_seqs, engine.max_num_batched_tokens, engine.gpu_memory_utilization) == (
        7,
        2048,
        0.5,
    )
    assert (engine.dtype, engine.tensor_parallel_size, engine.enable_prefix_caching) == ("float16", 2, False)
    assert (engine.block_size, engine.seed, engine.device, engine.load_format) == (32, 3, "cpu", "dummy")
    assert (engine.tokenizer, engine.chat_template, engine.enforce_eager) == ("/tok", "{{ x }}", True)
    assert (engine.num_gpu_blocks_override, engine.kv_cache_memory_bytes) == (99, 1024**3)
    assert server.served_model_names == ("a", "b") and server.model_name == "a"
    assert (server.host, server.port, server.api_keys) == ("127.0.0.1", 9000, ("k1", "k2"))
    assert server.disable_log_requests and server.uvicorn_log_level == "debug"
    with pytest.raises(AttributeError):
        server.port = 1  # type: ignore[misc]  # frozen

    engine, server = parse_args(["--model", "m"], environ={"PAGEDSERVE_API_KEY": "env-key"})
    assert engine.model == "m" and server.served_model_names == ("m",) and server.api_keys == ("env-key",)
    assert engine.enable_prefix_caching and server.host is None and server.port == 8000
    _, server = parse_args([], environ={"VLLM_API_KEY": "v", "PAGEDSERVE_API_KEY": "p"})
    assert server.api_keys == ("v",) and server.model == "smollm2-135m-instruct"
    assert parse_args([], environ={})[1].api_keys == ()
    with pytest.raises(SystemExit):
        parse_args(["a", "--model", "b"], environ={})
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "int3"], environ={})
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag"], environ={})
    assert [human_readable_int(v) for v in ("512", "2k", "2K", "1.5k", "3M", "1g")] == [
        512, 2000, 2048, 1500, 3 * 1024**2, 10**9,
    ]  # fmt: skip


def _stream_forever(server: ServerProcess) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as response:
            for _ in response.iter_lines():
                pass
    except httpx.HTTPError:
        pass  # the server going away mid-stream is the point


def _engine_death_is_503(server: ServerProcess) -> None:
    """Kill the engine core under a live stream: the stream ends with an error event and [DONE],
    /health and new requests answer 503, and nothing hangs."""
    (engine_pid,) = [
        pid for pid in descendants(server.proc.pid) if b"pagedserve-engine-core" in _cmdline(pid)
    ]
    body = {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        os.kill(engine_pid, signal.SIGKILL)
        events = parse_sse(itertools.chain([first], lines))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 503, events[-2]
    error = error_of(httpx.get(f"{server.base_url}/health", timeout=10), 503)
    assert error["type"] == "ServiceUnavailableError"
    error_of(httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "hi"}, timeout=10), 503)
    error_of(
        httpx.post(
            f"{server.base_url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        ),
        503,
    )


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.timeout(240)
def test_sigterm_and_sigint_leave_no_process_behind(tiny_model_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    servers = {
        signal.SIGTERM: ServerProcess(tiny_server_args(tiny_model_dir), tmp_path / "term.log"),
        signal.SIGINT: ServerProcess(
            [*tiny_server_args(tiny_model_dir), "--chat-template", str(template)], tmp_path / "int.log"
        ),
    }
    try:
        for server in servers.values():  # both start at once; wait for both
            server.wait_ready()
        sigint_server = servers[signal.SIGINT]
        # --chat-template replaces the model's template.
        ids = httpx.post(
            f"{sigint_server.base_url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}
        ).json()["tokens"]
        text = httpx.post(f"{sigint_server.base_url}/detokenize", json={"tokens": ids}).json()["prompt"]
        assert text == "<user>hi"
        _engine_death_is_503(sigint_server)
        for sig, server in servers.items():
            log = server.log_tail(20_000)
            assert "KV cache: 16,384 tokens" in log, log
            assert "maximum concurrency for 512 tokens per request: 32.00x" in log, log
            assert f"http://127.0.0.1:{server.port}" in log, log
            children = descendants(server.proc.pid)
            assert children, "the engine core runs as a child process"
            # SIGTERM with a stream in flight (uvicorn lets it run for the graceful period, then
            # cancels it); SIGINT on an idle server.
            streamer = threading.Thread(target=_stream_forever, args=(server,), daemon=True)
            if sig == signal.SIGTERM:
                streamer.start()
                time.sleep(1.0)  # the stream is under way
            started = time.monotonic()
            code = server.stop(sig, timeout=60)
            assert code == 0, (sig, code, server.log_tail())
            assert time.monotonic() - started < 30
            for _ in range(100):  # bounded: children may need a moment to be reaped
                if not any(is_running(pid) for pid in children):
                    break
                time.sleep(0.1)
            assert not any(is_running(pid) for pid in children), children
            if sig == signal.SIGTERM:
                streamer.join(30)
                assert not streamer.is_alive()
    finally:
        for server in servers.values():
            server.kill()


def test_a_bad_model_fails_startup_with_a_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "frontend", "--model", "/no/such/model.gguf", "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "/no/such/model.gguf" in result.stderr and "does not exist" in result.stderr
