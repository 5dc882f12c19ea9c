"""Online serving benchmark: a load generator for any OpenAI-compatible server (pagedserve, `vllm serve`).

Sends the shared workload (benchmarks/common.make_workload: token-id prompts, U[100,1024] in and out,
ignore_eos) as streaming POST /v1/completions requests, with Poisson arrivals at --request-rate
(seeded) or all at once (--request-rate inf), optionally capped at --max-concurrency in flight.
Per request it records the time to first token (TTFT), the inter-token latencies (ITL), the
end-to-end latency (E2E) and the output tokens of the final usage chunk; it reports throughput
and mean / p50 / p90 / p99 of TTFT, TPOT ((E2E - TTFT) / (tokens - 1) per request), ITL and E2E.

    python -m frontend --model llama3-8b --load-format dummy --max-model-len 2048 &
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --request-rate 4 --num-prompts 200 \\
        --out benchmarks/results/serving_pagedserve_llama3-8b_rate4_h200.json

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
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, make_workload
from benchmarks.server_probe import cpu_utilisation, histogram_means_ms, histogram_totals, process_tree_cpu

PERCENTILES = (50, 90, 99)
ERROR_TEXT_CHARS = 500  # keep failure records readable when a server returns a whole HTML page
WARMUP_MAX_TOKENS = 16


@dataclass(frozen=True)
class Request:
    index: int
    prompt: list[int]
    output_len: int


@dataclass
class Result:
    """One request's measurements; times are seconds from its send (``sent_s``: from the run start)."""

    index: int
    prompt_len: int
    requested_output_len: int
    sent_s: float = 0.0
    success: bool = False
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    chunks: int = 0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# ------------------------------------------------------------------------------------ the command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    parser.add_argument("--endpoint", default="/v1/completions")
    parser.add_argument("--model", default=None, help="served model name; default: the first of /v1/models")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--engine-label",
        default=None,
        help="engine name in the results (plots group by it); default: /v1/models' owned_by",
    )
    parser.add_argument(
        "--model-label", default=None, help="model name in the results (e.g. llama3-8b); default: --model"
    )
    parser.add_argument(
        "--server-tensor-parallel-size",
        type=int,
        default=1,
        help="the server's tensor-parallel size, recorded in the results (plots draw one series per size)",
    )
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload and of the arrivals")
    parser.add_argument("--input-len-range", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len-range", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    parser.add_argument("--vocab", type=int, default=10000, help="prompt token ids are drawn below this")
    parser.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals per second; inf: all at once"
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument(
        "--continuous-usage",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for usage on every chunk to count the tokens of each chunk",
    )
    parser.add_argument("--num-warmups", type=int, default=1, help="short untimed requests sent first")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for any byte")
    parser.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="the server's pid (same machine): record the CPU use of its processes during the run",
    )
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--out", default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    if args.num_prompts < 1:
        parser.error("--num-prompts must be at least 1")
    if args.request_rate <= 0:
        parser.error("--request-rate must be positive (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    for name in ("input_len_range", "output_len_range"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            parser.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX")
    return args


# ------------------------------------------------------------------------------------ the workload


def build_requests(args: argparse.Namespace) -> list[Request]:
    prompts, out_lens = make_workload(
        n=args.num_prompts,
        lin=tuple(args.input_len_range),
        lout=tuple(args.output_len_range),
        vocab=args.vocab,
        seed=args.seed,
    )
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
        "ignore_eos": True,
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


def make_client(args: argparse.Namespace) -> aiohttp.ClientSession:
    # One connection per request that may be in flight, so that no request waits on the pool and
    # the measured TTFT is the server's; the cap, if any, is the semaphore of run_all.
    connections = min(args.num_prompts, args.max_concurrency or args.num_prompts)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=args.timeout),
        trust_env=False,  # no proxy between the load generator and the server being measured
        read_bufsize=1 << 16,
    )


def url(args: argparse.Namespace, path: str) -> str:
    return args.base_url.rstrip("/") + "/" + path.lstrip("/")


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


# ------------------------------------------------------------------------------------ the report


def summarize(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds (None for an empty sample)."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    values_ms = 1000.0 * np.asarray(values_s, dtype=np.float64)
    stats = {"mean": float(values_ms.mean())}
    stats.update({f"p{p}": float(np.percentile(values_ms, p)) for p in PERCENTILES})
    return stats


def metrics(results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        # ignore_eos: a request that returned another length than it asked for is a server bug.
        "output_len_mismatches": sum(r.output_tokens != r.requested_output_len for r in ok),
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": summarize([r.ttft_s for r in ok]),
        "tpot_ms": summarize([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": summarize([gap for r in ok for gap in r.itl_s]),
        "e2e_ms": summarize([r.e2e_s for r in ok]),
    }


def request_records(results: list[Result]) -> list[dict[str, Any]]:
    """Per-request rows for the JSON (without the ITL lists, which would dwarf everything else)."""
    rows = []
    for r in results:
        row = {k: v for k, v in asdict(r).items() if k != "itl_s"}
        row["tpot_s"] = r.tpot_s
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(record: dict[str, Any]) -> str:
    res = record["results"]
    rate = float(record["settings"]["request_rate"])
    lines = [
        f"{'=' * 18} Serving benchmark: {record['engine']} / {record['model']} {'=' * 18}",
        f"{'request rate (req/s)':<34}{'inf (all at once)' if math.isinf(rate) else _fmt(rate)}",
        f"{'max concurrency':<34}{record['settings']['max_concurrency'] or '-'}",
        f"{'successful / failed requests':<34}{res['completed']} / {res['failed']}",
        f"{'duration (s)':<34}{_fmt(res['duration_s'])}",
        f"{'input / output tokens':<34}{res['total_input_tokens']:,} / {res['total_output_tokens']:,}",
        f"{'request throughput (req/s)':<34}{_fmt(res['request_throughput'])}",
        f"{'output token throughput (tok/s)':<34}{_fmt(res['output_throughput'], 1)}",
        f"{'total token throughput (tok/s)':<34}{_fmt(res['total_token_throughput'], 1)}",
        f"{'ms':<10}{'mean':>12}{'p50':>12}{'p90':>12}{'p99':>12}",
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        stats = res[f"{name}_ms"]
        cells = [stats["mean"], *(stats[f"p{p}"] for p in PERCENTILES)]
        lines.append(f"{name.upper():<10}" + "".join(f"{_fmt(c):>12}" for c in cells))
    if res["output_len_mismatches"]:
        lines.append(f"WARNING: {res['output_len_mismatches']} requests returned another output length")
    lines.append("=" * 60)
    return "\n".join(lines)


def build_record(
    args: argparse.Namespace,
    model: str,
    engine: str,
    version: dict[str, Any] | None,
    results: list[Result],
    duration: float,
) -> dict[str, Any]:
    settings = {**vars(args), "api_key": "<set>" if args.api_key else None}  # never store a key
    if math.isinf(args.request_rate):
        settings["request_rate"] = "inf"  # strict JSON has no infinity; float("inf") reads it back
    env = environment()
    if args.api_key:  # the key is on the command line that environment() records
        env["command"] = env["command"].replace(args.api_key, "<api-key>")
    return {
        "benchmark": "serving",
        "engine": engine,
        "model": args.model_label or model,
        "served_model_name": model,
        "tensor_parallel_size": args.server_tensor_parallel_size,
        **env,
        "server_version": version,
        "settings": settings,
        "results": metrics(results, duration),
        "errors": [{"index": r.index, "error": r.error} for r in results if not r.success],
        "requests": request_records(results),
    }


async def scrape_histograms(
    http: aiohttp.ClientSession, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    """The server's latency histograms (sum, count); empty where it has no /metrics."""
    try:
        status, body = await _get(http, url(args, "/metrics"))
    except aiohttp.ClientError:
        return {}
    return histogram_totals(body.decode(errors="replace")) if status == 200 else {}


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    requests = build_requests(args)
    async with make_client(args) as http:
        cards, version = await server_info(http, args)
        model = args.model or (cards[0]["id"] if cards else None)
        if model is None:
            raise RuntimeError("the server lists no model in /v1/models; pass --model")
        card = next((c for c in cards if c.get("id") == model), cards[0] if cards else {})
        engine = args.engine_label or card.get("owned_by") or "unknown"
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = asyncio.run(benchmark(args))
    except (RuntimeError, aiohttp.ClientError) as exc:  # no server, no model, a failed warm-up
        print(f"serving benchmark: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(format_table(record))
    print("breakdown:", json.dumps(record["breakdown"]))
    for failure in record["errors"][:5]:  # the first few, enough to see what went wrong
        print(f"request {failure['index']} failed: {failure['error']}", file=sys.stderr)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")
    return 0 if record["results"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
