"""``pagedserve bench serve``: a load generator for a running OpenAI-compatible server
(pagedserve, ``vllm serve``), with ``vllm bench serve``'s flags.

It sends the dataset (token-id prompts, see datasets) as streaming POST /v1/completions
requests, with Poisson arrivals at ``--request-rate`` (seeded) or all at once (inf, the
default), optionally capped at ``--max-concurrency`` in flight. Per request it records the time
to first token, the inter-token latencies, the end-to-end latency and the output tokens of the
final usage chunk, and it reports them as vLLM does (serve_metrics).

Token counting: every request asks for usage on every chunk (stream_options.continuous_usage_stats,
which vLLM and pagedserve support), so a chunk that carries k tokens (a server may hold back a
partial UTF-8 character and send several tokens at once) counts as k tokens and its gap to the
previous chunk is split into k equal ITLs. With --no-continuous-usage each chunk with text counts
as one token. Tokens that arrive together with the first one add no ITL.

The client is aiohttp (its HTTP parser is C), as in vLLM's own benchmark: a pure-Python client
spent ~0.65 s of CPU per second of a 12 req/s run and its event loop's queueing showed up as
latency that was the client's, not the server's. ``breakdown.client_cpu_per_wall_s`` says how
busy the load generator was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from frontend.bench.datasets import add_dataset_args, check_dataset_args, sample_workload
from frontend.bench.record import environment, write_result
from frontend.bench.serve_metrics import (
    METRICS,
    Request,
    Result,
    format_table,
    metrics,
    request_records,
    settings_of,
)
from frontend.bench.server_probe import (
    cpu_utilisation,
    histogram_means_ms,
    histogram_totals,
    process_tree_cpu,
)

API_KEY_ENV = "OPENAI_API_KEY"  # vLLM's benchmark sends it as the bearer key
ERROR_TEXT_CHARS = 500  # keep failure records readable when a server returns a whole HTML page
WARMUP_MAX_TOKENS = 16


# ------------------------------------------------------------------------------------ the command line


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--base-url", default=None, help="The server's root (without /v1). Default: from --host and --port."
    )
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default="/v1/completions", help="The completions route.")
    server.add_argument("--model", default=None, help="The model, as results name it and requests ask for it. "
                        "Default: the first of GET /v1/models.")  # fmt: skip
    server.add_argument(
        "--served-model-name", default=None, help="The name requests ask for, where it is not --model."
    )
    server.add_argument(
        "--api-key", default=None, help=f"Sent as 'Authorization: Bearer KEY'. Default: ${API_KEY_ENV}."
    )
    server.add_argument(
        "--timeout", type=float, default=600.0, help="Seconds to wait for any byte of a response."
    )
    server.add_argument("--server-pid", type=int, default=None, help="The server's pid (same machine): record "
                        "the CPU use of its processes during the run.")  # fmt: skip

    add_dataset_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the dataset and of the arrivals.")

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="Poisson arrivals per second; inf sends every request at once.")  # fmt: skip
    load.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight.")
    load.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature (0: greedy).")
    load.add_argument(
        "--ignore-eos", action="store_true", help="Ask for exactly each request's output length."
    )
    load.add_argument("--continuous-usage", action=argparse.BooleanOptionalAction, default=True,
                      help="Ask for usage on every chunk, to count the tokens of each chunk.")  # fmt: skip
    load.add_argument("--num-warmups", type=int, default=0, help="Short untimed requests sent first.")

    out = parser.add_argument_group("results")
    out.add_argument("--label", default=None, help="The engine's name in the results. Default: "
                     "/v1/models' owned_by.")  # fmt: skip
    out.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE",
                     help="Extra top-level fields of the JSON record, e.g. tensor_parallel_size=2.")  # fmt: skip
    out.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                     help=f"Comma-separated metrics to print, of {','.join(METRICS)}.")  # fmt: skip
    out.add_argument("--metric-percentiles", default="99", help="Comma-separated percentiles to print.")
    out.add_argument("--result-file", default=None, help="Write the JSON record here.")
    out.add_argument("--save-result", action="store_true", help="Write the JSON record into --result-dir.")
    out.add_argument("--result-dir", default=".", help="Directory of --save-result.")
    out.add_argument("--result-filename", default=None, help="File name of --save-result. "
                     "Default: LABEL-RATEqps-MODEL-TIMESTAMP.json.")  # fmt: skip
    out.add_argument("--disable-tqdm", action="store_true", help="Show no progress bar.")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_dataset_args(parser, args)
    if args.request_rate <= 0:
        parser.error("--request-rate must be positive (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    if args.num_warmups < 0:
        parser.error("--num-warmups must not be negative")
    unknown = [name for name in metric_names(args) if name not in METRICS]
    if unknown:
        parser.error(
            f"--percentile-metrics: unknown metric(s) {', '.join(unknown)} (choose from {', '.join(METRICS)})"
        )
    try:
        if not all(0 < p <= 100 for p in metric_percentiles(args)):
            parser.error("--metric-percentiles must be in (0, 100]")
    except ValueError:
        parser.error(f"--metric-percentiles: not a list of numbers: {args.metric_percentiles!r}")
    for item in args.metadata:
        if "=" not in item:
            parser.error(f"--metadata takes KEY=VALUE items, got {item!r}")
    if args.api_key is None:  # resolved once, here, like every other setting of the run
        args.api_key = os.environ.get(API_KEY_ENV) or None


def metric_names(args: argparse.Namespace) -> list[str]:
    return [name.strip() for name in args.percentile_metrics.split(",") if name.strip()]


def metric_percentiles(args: argparse.Namespace) -> list[float]:
    return [float(p) for p in args.metric_percentiles.split(",") if p.strip()]


# ------------------------------------------------------------------------------------ the workload


def build_requests(args: argparse.Namespace) -> list[Request]:
    prompts, out_lens = sample_workload(args)
    return [Request(i, p, n) for i, (p, n) in enumerate(zip(prompts, out_lens))]


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: a Poisson process (exponential gaps) or all at zero."""
    if math.isinf(rate):
        return [0.0] * n
    # Its own stream (seed, 1): the workload's draws stay those of the shared workload.
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0  # the first request goes out at once
    return np.cumsum(gaps).tolist()


# ------------------------------------------------------------------------------------ one request


def request_body(args: argparse.Namespace, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    stream_options = {"include_usage": True}
    if args.continuous_usage:
        stream_options["continuous_usage_stats"] = True
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "stream": True,
        "stream_options": stream_options,
    }


class _StreamState:
    """Token counting over the chunks of one stream."""

    def __init__(self, result: Result, start: float) -> None:
        self.result = result
        self.start = start
        self.counted = 0  # tokens seen in chunks so far
        self.final_usage: int | None = None
        self.last_token_time = 0.0

    def on_chunk(self, payload: dict[str, Any], now: float) -> None:
        if "error" in payload:  # an error after the 200 went out (vLLM and pagedserve send one event)
            error = payload["error"]
            raise RuntimeError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
        usage = payload.get("usage") or {}
        if "completion_tokens" in usage:
            self.final_usage = int(usage["completion_tokens"])
        choices = payload.get("choices") or []
        if not choices:
            return  # the usage-only chunk at the end
        if "completion_tokens" in usage:
            tokens = int(usage["completion_tokens"]) - self.counted
        else:
            tokens = 1 if choices[0].get("text") else 0
        if tokens <= 0:
            return  # e.g. a chunk with only a finish_reason
        self.result.chunks += 1
        if self.counted == 0:
            self.result.ttft_s = now - self.start
        else:
            gap = now - self.last_token_time
            self.result.itl_s.extend([gap / tokens] * tokens)
        self.counted += tokens
        self.last_token_time = now


async def run_request(
    http: aiohttp.ClientSession, args: argparse.Namespace, model: str, request: Request, result: Result
) -> None:
    """Stream one completion, filling ``result``; never raises (a failure is recorded)."""
    body = request_body(args, model, request.prompt, request.output_len)
    start = time.perf_counter()
    state = _StreamState(result, start)
    done = False
    try:
        async with http.post(url(args, args.endpoint), json=body) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                result.error = f"HTTP {response.status}: {text[:ERROR_TEXT_CHARS]}"
                return
            async for raw in response.content:  # one SSE line at a time
                if not raw.startswith(b"data:"):
                    continue  # blank separators, SSE comments (keep-alives)
                data = raw[len(b"data:") :].strip()
                if data == b"[DONE]":
                    done = True
                    break
                state.on_chunk(json.loads(data), time.perf_counter())
        result.e2e_s = time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:  # ValueError: bad JSON
        result.error = f"{type(exc).__name__}: {str(exc)[:ERROR_TEXT_CHARS]}"
        return
    result.output_tokens = state.final_usage if state.final_usage is not None else state.counted
    if not done:
        result.error = "the stream ended without [DONE]"
    elif state.counted == 0:
        result.error = "no tokens were streamed"
    else:
        result.success = True


def make_client(args: argparse.Namespace, num_requests: int) -> aiohttp.ClientSession:
    # One connection per request that may be in flight, so that no request waits on the pool and
    # the measured TTFT is the server's; the cap, if any, is the semaphore of run_all.
    connections = min(num_requests, args.max_concurrency or num_requests)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=args.timeout),
        trust_env=False,  # no proxy between the load generator and the server being measured
        read_bufsize=1 << 16,
    )


def url(args: argparse.Namespace, path: str) -> str:
    base = args.base_url or f"http://{args.host}:{args.port}"
    return base.rstrip("/") + "/" + path.lstrip("/")


async def _get(http: aiohttp.ClientSession, address: str) -> tuple[int, bytes]:
    async with http.get(address) as response:
        return response.status, await response.read()


async def server_info(
    http: aiohttp.ClientSession, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The /v1/models cards and the /version body (None where the server has no such route)."""
    status, body = await _get(http, url(args, "/v1/models"))
    if status != 200:
        raise RuntimeError(f"GET /v1/models answered HTTP {status}: {body[:ERROR_TEXT_CHARS]!r}")
    cards = json.loads(body).get("data") or []
    version = None
    try:
        status, body = await _get(http, url(args, "/version"))
        if status == 200:
            version = json.loads(body)
    except (aiohttp.ClientError, ValueError):
        pass
    return cards, version


async def warm_up(
    http: aiohttp.ClientSession, args: argparse.Namespace, model: str, requests: list[Request]
) -> None:
    """A few short requests first, so first-call costs (kernel compilation, connection setup) are
    not measured; a server that fails them is not worth measuring."""
    for i in range(args.num_warmups):
        request = requests[i % len(requests)]
        warm = Request(-1, request.prompt, min(WARMUP_MAX_TOKENS, request.output_len))
        result = Result(-1, len(warm.prompt), warm.output_len)
        await run_request(http, args, model, warm, result)
        if not result.success:
            raise RuntimeError(f"the warm-up request failed: {result.error}")


async def run_all(
    http: aiohttp.ClientSession, args: argparse.Namespace, model: str, requests: list[Request]
) -> tuple[list[Result], float]:
    """Send every request at its arrival time; returns the results and the run's duration."""
    offsets = arrival_offsets(len(requests), args.request_rate, args.seed)
    results = [Result(r.index, len(r.prompt), r.output_len) for r in requests]
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    progress = tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests", unit="req")
    start = time.perf_counter()

    async def one(request: Request, result: Result) -> None:
        async with limit:  # requests over the cap queue here, as in vLLM's benchmark
            result.sent_s = time.perf_counter() - start
            await run_request(http, args, model, request, result)
        progress.update(1)

    tasks = []
    for request, result, offset in zip(requests, results, offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request, result)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    return results, duration


# ------------------------------------------------------------------------------------ the run


async def scrape_histograms(
    http: aiohttp.ClientSession, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    """The server's latency histograms (sum, count); empty where it has no /metrics."""
    try:
        status, body = await _get(http, url(args, "/metrics"))
    except aiohttp.ClientError:
        return {}
    return histogram_totals(body.decode(errors="replace")) if status == 200 else {}


def build_record(
    args: argparse.Namespace,
    model: str,
    engine: str,
    version: dict[str, Any] | None,
    results: list[Result],
    duration: float,
) -> dict[str, Any]:
    env = environment()
    if args.api_key:  # the key may be on the command line that environment() records
        env["command"] = env["command"].replace(args.api_key, "<api-key>")
    record = {
        "benchmark": "serving",
        "engine": engine,
        "model": args.model or model,
        "served_model_name": model,
        **env,
        "server_version": version,
        "settings": settings_of(args),
        "results": metrics(results, duration, args.ignore_eos, metric_percentiles(args)),
        "errors": [{"index": r.index, "error": r.error} for r in results if not r.success],
        "requests": request_records(results),
    }
    record.update(item.split("=", 1) for item in args.metadata)  # as vLLM: top-level fields
    return record


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    requests = build_requests(args)
    async with make_client(args, len(requests)) as http:
        cards, version = await server_info(http, args)
        model = args.served_model_name or args.model or (cards[0]["id"] if cards else None)
        if model is None:
            raise RuntimeError("the server lists no model in /v1/models; pass --model")
        card = next((c for c in cards if c.get("id") == model), cards[0] if cards else {})
        engine = args.label or card.get("owned_by") or "unknown"
        await warm_up(http, args, model, requests)
        histograms = await scrape_histograms(http, args)
        server_cpu = process_tree_cpu(args.server_pid) if args.server_pid else {}
        client_cpu = time.process_time()
        results, duration = await run_all(http, args, model, requests)
        client_cpu = time.process_time() - client_cpu
        breakdown = {
            "server_histogram_means": histogram_means_ms(histograms, await scrape_histograms(http, args)),
            "client_cpu_per_wall_s": client_cpu / duration,
            "server_cpu": cpu_utilisation(
                server_cpu, process_tree_cpu(args.server_pid) if args.server_pid else {}, duration
            ),
        }
    record = build_record(args, model, engine, version, results, duration)
    record["breakdown"] = breakdown
    return record


def result_path(args: argparse.Namespace, record: dict[str, Any]) -> Path | None:
    """--result-file, else with --save-result a file in --result-dir named as vLLM names it."""
    if args.result_file:
        return Path(args.result_file)
    if not args.save_result:
        return None
    name = args.result_filename
    if name is None:
        rate = record["settings"]["request_rate"]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{record['engine']}-{rate}qps-{Path(record['model']).name}-{stamp}.json"
    return Path(args.result_dir) / name


def run(args: argparse.Namespace) -> int:
    try:
        record = asyncio.run(benchmark(args))
    except (RuntimeError, aiohttp.ClientError, OSError) as exc:  # no server, no model, a failed warm-up
        print(f"serving benchmark: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(format_table(record, metric_names(args), metric_percentiles(args)))
    print("breakdown:", json.dumps(record["breakdown"]))
    for failure in record["errors"][:5]:  # the first few, enough to see what went wrong
        print(f"request {failure['index']} failed: {failure['error']}", file=sys.stderr)
    path = result_path(args, record)
    if path is not None:
        write_result(path, record, echo=False)
    return 0 if record["results"]["failed"] == 0 else 1
