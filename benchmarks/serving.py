"""Online serving benchmark: a load generator for any OpenAI-compatible server (pagedserve, `vllm serve`).

Sends the shared workload (token-id prompts, U[100,1024] in and out, ignore_eos) as streaming
POST /v1/completions requests, with Poisson arrivals at --request-rate (seeded) or all at once
(--request-rate inf), optionally capped at --max-concurrency in flight, and reports throughput and
the mean and percentiles of TTFT, TPOT, ITL and E2E (see frontend/bench/serve.py).

    python -m frontend --model llama3-8b --load-format dummy --max-model-len 2048 &
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --request-rate 4 --num-prompts 200 \\
        --out benchmarks/results/serving_pagedserve_llama3-8b_rate4_h200.json

A wrapper over ``pagedserve bench serve --dataset-name shared --ignore-eos`` with the suite's
names: --model is the served model (--served-model-name), --model-label its name in the results
(--model), --engine-label is --label, --server-tensor-parallel-size becomes the record's
tensor_parallel_size, --input-len-range / --output-len-range narrow the workload, --out is
--result-file; any other flag of ``pagedserve bench serve`` passes through.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frontend.bench.cli import main as bench_main

SUITE_FLAGS = ["--dataset-name", "shared", "--ignore-eos", "--temperature", "0.6", "--num-warmups", "1"]


def bench_argv(argv: Sequence[str] | None = None) -> list[str]:
    """The ``pagedserve bench serve`` arguments for this script's arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="served model name; default: the first of /v1/models")
    parser.add_argument("--model-label", default=None, help="model name in the results; default: --model")
    parser.add_argument("--engine-label", default=None, help="engine name in the results; default: owned_by")
    parser.add_argument("--server-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--input-len-range", nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--output-len-range", nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--out", default=None, help="write the JSON record here")
    args, rest = parser.parse_known_args(argv)
    renamed = {
        "--served-model-name": args.model,
        "--model": args.model_label or args.model,
        "--label": args.engine_label,
        "--result-file": args.out,
    }
    out = ["serve", *SUITE_FLAGS, "--metadata", f"tensor_parallel_size={args.server_tensor_parallel_size}"]
    out += [token for flag, value in renamed.items() if value is not None for token in (flag, value)]
    for kind, bounds in (("input", args.input_len_range), ("output", args.output_len_range)):
        if bounds is not None:
            out += [f"--shared-{kind}-len-range", *bounds]
    return [*out, *rest]


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(bench_argv(argv))


if __name__ == "__main__":
    sys.exit(main())
