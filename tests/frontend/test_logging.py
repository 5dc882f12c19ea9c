"""Logging as vLLM users expect it: one set-up for every process kind (ipc.logging_setup) and the
periodic engine stats line (frontend.stat_logger)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from core.engine_args import EngineArgs
from frontend.cli import build_parser, parse_args
from frontend.llm import LLM
from frontend.stat_logger import LoggingStatLogger
from ipc.logging_setup import (
    CONFIGURE_ENV,
    LEVEL_ENV,
    PROJECT_LOGGERS,
    ProcessLogHandler,
    setup_logging,
)
from ipc.messages import SchedulerStats
from ipc.sampling_params import SamplingParams
from tests.frontend import test_async_llm
from tests.server.conftest import ServerProcess

# A 1-layer random Llama checkpoint (vocabulary of 128, no tokenizer), shared with the AsyncLLM tests.
tiny_model_dir = test_async_llm.tiny_model_dir

# One line of ipc.logging_setup's format: "INFO 12-05 10:00:00 [engine pid=4242] logger: message".
LINE = re.compile(
    r"^(?P<level>[A-Z]+) \d\d-\d\d \d\d:\d\d:\d\d \[(?P<tag>[^\]]+) pid=(?P<pid>\d+)\] (?P<rest>.*)$"
)
STATS = re.compile(
    r"Avg prompt throughput: (?P<prompt>[\d.]+) tokens/s, Avg generation throughput: (?P<gen>[\d.]+) tokens/s, "
    r"Running: (?P<running>\d+) reqs, Waiting: (?P<waiting>\d+) reqs, GPU KV cache usage: [\d.]+%, "
    r"Prefix cache hit rate: [\d.]+%, Preemptions: \d+$"
)


@pytest.fixture(autouse=True)
def pristine_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts as a fresh process would (no set-up done, the variables unset) and
    leaves the project's loggers as it found them."""
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    monkeypatch.delenv(CONFIGURE_ENV, raising=False)
    loggers = [logging.getLogger(name) for name in PROJECT_LOGGERS]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [h for h in lg.handlers if not isinstance(h, ProcessLogHandler)]
        lg.setLevel(logging.NOTSET)
        lg.propagate = True
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved):
        lg.handlers, lg.propagate = handlers, propagate
        lg.setLevel(level)


def our_handlers(name: str) -> list[logging.Handler]:
    return [h for h in logging.getLogger(name).handlers if isinstance(h, ProcessLogHandler)]


# ---------------------------------------------------------------- setup_logging


def test_setup_is_idempotent_and_leaves_the_root_alone() -> None:
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    assert setup_logging("api_server") == logging.INFO
    first = our_handlers("core")[0]
    for _ in range(3):
        setup_logging("api_server")
    # A later call (the AsyncLLM the server creates) keeps the first tag and the level.
    assert setup_logging("frontend") == logging.INFO
    for name in PROJECT_LOGGERS:
        lg = logging.getLogger(name)
        assert our_handlers(name) == [first] and not lg.propagate and lg.level == logging.INFO
    assert first.process_tag == "api_server"
    # Naming a level changes it and nothing else.
    assert setup_logging("frontend", "debug") == logging.DEBUG
    assert all(
        logging.getLogger(n).level == logging.DEBUG and our_handlers(n) == [first] for n in PROJECT_LOGGERS
    )
    assert root.handlers == root_handlers and root.level == root_level
    assert logging.getLogger("myapp").propagate  # a user's own loggers still reach the root


def test_format_has_level_time_tag_pid_and_logger(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker rank 1", logging.DEBUG)
    logging.getLogger("workers.some_module").debug("hello %s", "there")
    logging.getLogger("kernels.gemm").warning("%d%% sure", 100)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    first, second = (LINE.match(line) for line in lines)
    assert first is not None and second is not None, lines
    assert (first["level"], first["tag"], int(first["pid"])) == ("DEBUG", "worker rank 1", os.getpid())
    assert first["rest"] == "workers.some_module: hello there"
    assert (second["level"], second["rest"]) == ("WARNING", "kernels.gemm: 100% sure")


def test_level_from_argument_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert setup_logging("api_server") == logging.INFO  # neither given
    monkeypatch.setenv(LEVEL_ENV, "DEBUG")
    assert setup_logging("api_server", "warning") == logging.WARNING  # the flag wins
    assert logging.getLogger("frontend.engine_client").getEffectiveLevel() == logging.WARNING
    assert setup_logging("engine", logging.ERROR) == logging.ERROR  # a parent's level, as a number


def test_level_from_the_environment_when_no_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEVEL_ENV, "debug")
    assert setup_logging("engine") == logging.DEBUG
    assert logging.getLogger("core.scheduler").isEnabledFor(logging.DEBUG)


def test_bad_levels_are_errors_that_name_them(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'verbose'"):
        setup_logging("engine", "verbose")
    monkeypatch.setenv(LEVEL_ENV, "loud")
    with pytest.raises(ValueError, match=f"{LEVEL_ENV}.*'loud'"):
        setup_logging("engine")
    monkeypatch.setenv(CONFIGURE_ENV, "no")
    with pytest.raises(ValueError, match=f"{CONFIGURE_ENV}.*'no'"):
        setup_logging("engine")


def test_configure_logging_0_leaves_handlers_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIGURE_ENV, "0")
    monkeypatch.setenv(LEVEL_ENV, "debug")
    user_handler = logging.NullHandler()
    core = logging.getLogger("core")
    core.addHandler(user_handler)
    try:
        before = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level) for n in PROJECT_LOGGERS}
        assert setup_logging("api_server", "info") is None
        after = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level) for n in PROJECT_LOGGERS}
        assert after == before and all(logging.getLogger(n).propagate for n in PROJECT_LOGGERS)
    finally:
        core.removeHandler(user_handler)


def test_serve_flags_reach_the_configs() -> None:
    engine, server = parse_args(
        ["--model", "m", "--log-level", "debug", "--log-stats-interval", "2.5", "--disable-log-stats"],
        environ={},
    )
    assert (server.log_level, engine.log_stats_interval, engine.disable_log_stats) == ("debug", 2.5, True)
    engine, server = parse_args(["--model", "m"], environ={})
    assert (server.log_level, engine.log_stats_interval, engine.disable_log_stats) == (None, 10.0, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--log-level", "verbose"])
    with pytest.raises(ValueError, match="log_stats_interval must be positive, got 0"):
        EngineArgs(log_stats_interval=0).create_engine_config()


# ---------------------------------------------------------------- the stats line


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def stats_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "frontend.stat_logger"]


def line(prompt: str, gen: str, running: int, waiting: int, kv: str, hit: str, preempted: int) -> str:
    return (
        f"Avg prompt throughput: {prompt} tokens/s, Avg generation throughput: {gen} tokens/s, "
        f"Running: {running} reqs, Waiting: {waiting} reqs, GPU KV cache usage: {kv}%, "
        f"Prefix cache hit rate: {hit}%, Preemptions: {preempted}"
    )


def test_stats_line_numbers_over_an_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "frontend.stat_logger")
    clock = FakeClock()
    stat_logger = LoggingStatLogger(10.0, clock)
    clock.now = 1.0
    stat_logger.record(
        SchedulerStats(
            num_running_reqs=2,
            num_waiting_reqs=1,
            kv_cache_usage=0.25,
            prefix_cache_queries=80,
            prefix_cache_hits=20,
            num_prompt_tokens=100,
        )
    )
    clock.now = 5.0
    stat_logger.record(SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, num_generation_tokens=30))
    assert stats_lines(caplog) == []  # not yet an interval
    clock.now = 12.5
    stat_logger.record(
        SchedulerStats(num_running_reqs=3, kv_cache_usage=0.375, num_generation_tokens=20, num_preemptions=1)
    )
    # 100 prompt and 50 generated tokens over 12.5 s; the gauges are the latest ones.
    assert stats_lines(caplog) == [line("8.0", "4.0", 3, 0, "37.5", "25.0", 1)]

    # The engine goes idle: the interval that holds its last tokens is still reported, once.
    clock.now = 15.0
    stat_logger.record(SchedulerStats(num_generation_tokens=7))
    for now in (30.0, 45.0, 100.0, 1000.0):
        clock.now = now
        stat_logger.record(SchedulerStats())
    # 7 tokens over 17.5 s; no look-ups, so the last interval's hit rate stands.
    assert stats_lines(caplog)[1:] == [line("0.0", "0.4", 0, 0, "0.0", "25.0", 0)]


def test_nothing_is_logged_while_idle_and_idle_time_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "frontend.stat_logger")
    clock = FakeClock()
    stat_logger = LoggingStatLogger(10.0, clock)
    for now in (3.0, 11.0, 25.0, 60.0):
        clock.now = now
        stat_logger.record(SchedulerStats(kv_cache_usage=0.5))  # cached blocks, but nothing to do
    assert stats_lines(caplog) == []
    # Work arrives at 95 s: the interval starts at 90 s, the last boundary, not at the idle's start.
    clock.now = 95.0
    stat_logger.record(SchedulerStats(num_running_reqs=1, num_prompt_tokens=50, prefix_cache_queries=50))
    clock.now = 100.0
    stat_logger.record(SchedulerStats(num_running_reqs=1, num_generation_tokens=20, kv_cache_usage=0.125))
    assert stats_lines(caplog) == [line("5.0", "2.0", 1, 0, "12.5", "0.0", 0)]


def test_the_event_loop_timer_logs_the_interval_in_which_the_engine_goes_idle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "frontend.stat_logger")
    clock = FakeClock()
    stat_logger = LoggingStatLogger(10.0, clock)

    async def main() -> list[str]:
        clock.now = 9.95  # the timer is set for the interval's end, 0.05 s of loop time away
        stat_logger.record_on_loop(SchedulerStats(num_running_reqs=1, num_prompt_tokens=30))
        clock.now = 9.96
        stat_logger.record_on_loop(SchedulerStats(num_generation_tokens=10))  # finished: idle
        assert stats_lines(caplog) == []
        clock.now = 10.0
        await asyncio.sleep(0.3)  # no more stats arrive; the timer fires
        logged = stats_lines(caplog)
        clock.now = 50.0
        await asyncio.sleep(0.2)
        assert stats_lines(caplog) == logged  # idle: no timer, no line
        return logged

    assert asyncio.run(main()) == [line("3.0", "1.0", 0, 0, "0.0", "0.0", 0)]


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="log_stats_interval must be positive, got -1"):
        LoggingStatLogger(-1.0)


# ---------------------------------------------------------------- end to end


def make_llm(path: Path, **kwargs) -> LLM:
    return LLM(
        str(path),
        engine_process=False,
        skip_tokenizer_init=True,
        max_model_len=1024,
        num_gpu_blocks_override=512,
        block_size=8,
        **kwargs,
    )


@pytest.mark.timeout(120)
def test_offline_llm_logs_stats_only_when_asked(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = [{"prompt_token_ids": list(range(1, 40 + i))} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    quiet = make_llm(tiny_model_dir)  # vLLM's LLM default: disable_log_stats=True
    try:
        quiet.generate(prompts, params, use_tqdm=False)
    finally:
        quiet.shutdown()
    assert "Avg prompt throughput" not in capsys.readouterr().err

    llm = make_llm(tiny_model_dir, disable_log_stats=False, log_stats_interval=0.1)
    try:
        start = time.monotonic()
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.monotonic() - start
    finally:
        llm.shutdown()
    matches = [LINE.match(text) for text in capsys.readouterr().err.splitlines()]
    found = [m for m in matches if m is not None and m["rest"].startswith("frontend.stat_logger: ")]
    assert elapsed > 0.1 and found, elapsed
    assert all((m["level"], m["tag"], int(m["pid"])) == ("INFO", "frontend", os.getpid()) for m in found)
    stats = [STATS.search(m["rest"]) for m in found]
    assert all(s is not None for s in stats), found
    assert any(float(s["gen"]) > 0 and int(s["running"]) == 4 for s in stats), found


@pytest.mark.timeout(240)
def test_server_logs_stats_during_a_long_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The variable asks for warnings only; --log-level info wins, in the API server and in the
    # engine-core process (which receives the level from its parent).
    env = {**os.environ, LEVEL_ENV: "warning"}
    env.pop(CONFIGURE_ENV, None)
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--skip-tokenizer-init"]
    args += ["--max-model-len", "4096", "--num-gpu-blocks-override", "1024", "--disable-log-requests"]
    args += ["--log-stats-interval", "1", "--log-level", "info"]
    server = ServerProcess(args, tmp_path / "server.log", env)
    try:
        server.wait_ready()
        body = {
            "model": "tiny",
            "prompt": [1, 2, 3, 4, 5],
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
        seen: list[re.Match[str]] = []
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=120.0) as response:
            assert response.status_code == 200
            for _ in response.iter_lines():
                seen = [m for m in map(STATS.search, server.log_tail(100_000).splitlines()) if m is not None]
                if seen:
                    break  # closing the stream aborts the request
        assert seen, f"no stats line while the request ran:\n{server.log_tail()}"
        assert int(seen[0]["running"]) == 1 and float(seen[0]["gen"]) > 0
        lines = [m for m in map(LINE.match, server.log_tail(100_000).splitlines()) if m is not None]
        tags = {(m["tag"], m["level"]) for m in lines}
        assert ("api_server", "INFO") in tags and ("engine", "INFO") in tags, server.log_tail()
        stats_line = next(m for m in lines if STATS.search(m["rest"]))
        assert stats_line["tag"] == "api_server" and int(stats_line["pid"]) == server.proc.pid
    finally:
        server.stop()
