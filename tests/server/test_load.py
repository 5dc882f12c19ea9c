"""Many streams at once, and clients that leave: aborts must free the engine at once."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, TINY_NAME, ServerProcess, parse_sse

pytestmark = pytest.mark.timeout(180)

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def scrape(base_url: str) -> dict[str, float]:
    """The server's pagedserve metrics as {'name{labels}': value}."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(pagedserve:\S+) (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted({**labels, "model_name": TINY_NAME}.items()))
    return values[f"pagedserve:{name}{{{label_text}}}"]


def test_64_concurrent_streams(tiny_server: ServerProcess) -> None:
    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, int]:
        route, body = (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Count to {i}."}]})
            if i % 2
            else ("/v1/completions", {"prompt": f"Stream number {i}:"})
        )
        body = {
            **body,
            "max_tokens": 12,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.stream("POST", route, json=body) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines()]
        events = parse_sse(iter(lines))
        assert events[-1] == "[DONE]"
        return events[0]["id"], events[-2]["usage"]["completion_tokens"]

    async def main() -> list[tuple[str, int]]:
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(
            base_url=tiny_server.base_url, headers=HEADERS, limits=limits, timeout=120
        ) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(64))), 150)

    results = asyncio.run(main())
    assert len({request_id for request_id, _ in results}) == 64
    assert all(tokens == 12 for _, tokens in results)


def test_cancelled_streams_free_the_engine(tiny_server: ServerProcess) -> None:
    before = scrape(tiny_server.base_url)
    max_tokens = 480

    async def leave_early(http: httpx.AsyncClient, i: int, started: asyncio.Event) -> int:
        body = {"prompt": f"Long story {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        seen = 0
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    started.set()
                    break  # leaving the block closes the connection mid-stream
        return seen

    async def leave_non_streaming(http: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": f"Long answer {i}", "max_tokens": max_tokens, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=body, timeout=1.0)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=tiny_server.base_url, headers=HEADERS, timeout=60) as http:
            started = asyncio.Event()
            await asyncio.wait_for(
                asyncio.gather(
                    *(leave_early(http, i, started) for i in range(16)),
                    *(leave_non_streaming(http, i) for i in range(4)),
                ),
                60,
            )

    asyncio.run(main())
    left = time.monotonic()
    deadline = left + 10.0
    while True:
        after = scrape(tiny_server.base_url)
        idle = (
            metric(after, "num_requests_running") == 0
            and metric(after, "num_requests_waiting") == 0
            and metric(after, "kv_cache_usage_perc") == 0
        )
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, {k: v for k, v in after.items() if "num_requests" in k or "kv_cache" in k}
    aborted = metric(after, "request_success_total", finished_reason="abort") - metric(
        before, "request_success_total", finished_reason="abort"
    )
    # Every stream counts; a non-streaming request counts once it reached the engine (a client
    # that gives up before then aborts nothing).
    assert 16 <= aborted <= 20, aborted
    # Aborted, not finished: far fewer tokens were generated than the requests asked for.
    generated = metric(after, "generation_tokens_total") - metric(before, "generation_tokens_total")
    assert generated < 20 * max_tokens / 2, generated
    # And the server still answers.
    response = httpx.post(
        f"{tiny_server.base_url}/v1/completions",
        json={"prompt": "Still there?", "max_tokens": 3, "ignore_eos": True},
        headers=HEADERS,
        timeout=30,
    )
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
