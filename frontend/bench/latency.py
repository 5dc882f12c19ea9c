"""``pagedserve bench latency``: the latency of one batch, as ``vllm bench latency``: a batch of
``--batch-size`` random token-id prompts of ``--input-len`` tokens, greedy, ``--output-len``
tokens each (ignore_eos), run ``--num-iters-warmup`` untimed and ``--num-iters`` timed times.

Reported: the batch's end-to-end latency (mean and percentiles, as vLLM), and per request the
time to first token and the milliseconds per output token after it (medians). Every iteration
starts from an empty prefix cache, so each pays its full prefill.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from frontend.bench.datasets import PROMPT_VOCAB
from frontend.bench.record import add_result_args, environment, model_label, write_result
from frontend.cli import add_engine_args, engine_args_from

LATENCY_PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--input-len", type=int, default=32, help="Prompt tokens per request.")
    bench.add_argument("--output-len", type=int, default=128, help="Output tokens per request.")
    bench.add_argument("--batch-size", type=int, default=8, help="Requests per batch.")
    bench.add_argument("--num-iters-warmup", type=int, default=10, help="Untimed iterations first.")
    bench.add_argument("--num-iters", type=int, default=30, help="Timed iterations.")
    add_result_args(bench)
    add_engine_args(parser)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, least in (
        ("--input-len", args.input_len, 1),
        ("--output-len", args.output_len, 1),
        ("--batch-size", args.batch_size, 1),
        ("--num-iters-warmup", args.num_iters_warmup, 0),
        ("--num-iters", args.num_iters, 1),
    ):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")


@dataclasses.dataclass(slots=True)
class Timings:
    """Seconds: per timed iteration the batch's latency; per request its TTFT and time per
    output token after the first (none for a one-token output)."""

    batch_s: list[float] = dataclasses.field(default_factory=list)
    ttft_s: list[float] = dataclasses.field(default_factory=list)
    tpot_s: list[float] = dataclasses.field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    from frontend import LLM, SamplingParams

    llm = LLM(**dataclasses.asdict(engine_args_from(args)))
    timings = Timings()
    try:
        vocab = min(PROMPT_VOCAB, llm.config.model.vocab_size)
        rng = np.random.default_rng(args.seed)
        prompts = rng.integers(0, vocab, size=(args.batch_size, args.input_len)).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        for _ in range(args.num_iters_warmup):
            llm.reset_prefix_cache()
            llm.generate(prompts, params, use_tqdm=False)
        for _ in tqdm(range(args.num_iters), desc="Profiling iterations", disable=args.disable_tqdm):
            llm.reset_prefix_cache()  # every iteration pays its full prefill
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            timings.batch_s.append(time.perf_counter() - start)
            for out in outputs:
                m, n = out.metrics, len(out.outputs[0].token_ids)
                timings.ttft_s.append(m.first_token_time - m.arrival_time)
                if n > 1:
                    timings.tpot_s.append((m.last_token_time - m.first_token_time) / (n - 1))
    finally:
        llm.shutdown()
    record = build_record(args, timings)
    print(f"Avg latency: {record['avg_latency']:.4f} seconds")
    for p, value in record["percentiles"].items():
        print(f"{p}% percentile latency: {value:.4f} seconds")
    if args.result_file:
        write_result(args.result_file, record)
    return 0


def _median_ms(values_s: list[float]) -> float | None:
    return 1000 * statistics.median(values_s) if values_s else None


def build_record(args: argparse.Namespace, timings: Timings) -> dict[str, Any]:
    batch = np.asarray(timings.batch_s)
    return {
        "benchmark": "latency",
        "model": model_label(args),
        **environment(),
        "settings": vars(args),
        "ttft_ms_median": _median_ms(timings.ttft_s),
        "ms_per_output_token_median": _median_ms(timings.tpot_s),
        "e2e_s_median": statistics.median(timings.batch_s),
        "ttft_ms_all": [1000 * t for t in timings.ttft_s],
        "ms_per_output_token_all": [1000 * t for t in timings.tpot_s],
        "avg_latency": float(batch.mean()),
        "latencies": timings.batch_s,
        "percentiles": {str(p): float(np.percentile(batch, p)) for p in LATENCY_PERCENTILES},
    }
