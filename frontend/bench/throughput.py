"""``pagedserve bench throughput``: offline throughput of one engine through the LLM API, as
``vllm bench throughput``: the whole dataset submitted at once, ignore_eos (every request makes
exactly its output length), one seeded sampler per request.

A few short requests warm the engine up first (kernel compilation is not timed); each of the
``--num-iters`` timed runs starts from an empty prefix cache, and the median run is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from typing import Any

from frontend.bench.datasets import add_dataset_args, check_dataset_args, sample_workload
from frontend.bench.record import add_result_args, environment, model_label, write_result
from frontend.cli import add_engine_args, engine_args_from

logger = logging.getLogger(__name__)

WARMUP_PROMPTS = 8
WARMUP_MAX_TOKENS = 16


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_dataset_args(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument(
        "--temperature", type=float, default=1.0, help="Sampling temperature of every request."
    )
    bench.add_argument(
        "--num-iters",
        type=int,
        default=1,
        help="Timed runs of the workload in one engine; the median is reported.",
    )
    add_result_args(bench)
    add_engine_args(parser)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_dataset_args(parser, args)
    if args.num_iters < 1:
        parser.error(f"--num-iters must be at least 1, got {args.num_iters}")


def run(args: argparse.Namespace) -> int:
    from frontend import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**dataclasses.asdict(engine_args_from(args)))
    ready_s = time.perf_counter() - start
    try:
        prompts, out_lens = sample_workload(args, vocab=llm.config.model.vocab_size)
        params = [
            SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True, seed=i)
            for i, n in enumerate(out_lens)
        ]
        warmup = SamplingParams(temperature=args.temperature, max_tokens=WARMUP_MAX_TOKENS, ignore_eos=True)
        llm.generate(prompts[:WARMUP_PROMPTS], warmup, use_tqdm=False)
        runs_s = []
        for _ in range(args.num_iters):
            llm.reset_prefix_cache()  # a run must prefill its prompts again, not hit the cache
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
            runs_s.append(time.perf_counter() - start)
            output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            if output_tokens != sum(out_lens):
                raise RuntimeError(
                    f"the requests made {output_tokens} output tokens, not the {sum(out_lens)} asked for"
                )
        kv_capacity, preemptions = llm.engine.kv_capacity_tokens, llm.stats.num_preemptions
    finally:
        llm.shutdown()
    record = build_record(args, prompts, output_tokens, runs_s, ready_s, kv_capacity, preemptions)
    print(
        f"Throughput: {record['requests_per_second']:.2f} requests/s, "
        f"{record['total_tokens_per_s']:.2f} total tokens/s, {record['output_tokens_per_s']:.2f} output tokens/s"
    )
    print(f"Total num prompt tokens:  {record['prompt_tokens']}")
    print(f"Total num output tokens:  {record['output_tokens']}")
    if args.result_file:
        write_result(args.result_file, record)
    return 0


def build_record(
    args: argparse.Namespace,
    prompts: list[list[int]],
    output_tokens: int,
    runs_s: list[float],
    ready_s: float,
    kv_capacity: int,
    preemptions: int,
) -> dict[str, Any]:
    elapsed = statistics.median(runs_s)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "benchmark": "throughput",
        "model": model_label(args),
        **environment(),
        "settings": vars(args),
        "num_requests": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "elapsed_s": elapsed,
        "runs_s": runs_s,
        "runs_output_tokens_per_s": [output_tokens / t for t in runs_s],
        "requests_per_second": len(prompts) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / elapsed,
        "time_to_ready_s": ready_s,
        "kv_capacity_tokens": kv_capacity,
        "preemptions": preemptions,
    }
