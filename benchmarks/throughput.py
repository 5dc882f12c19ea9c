"""Offline throughput on the shared workload (../shared/bench): 256 token-id prompts, U[100,1024] in
and out, ignore_eos, temperature 0.6, random weights of a real shape.

    python benchmarks/throughput.py --model llama3-8b --out benchmarks/results/throughput_llama3-8b_h200.json

A wrapper over ``pagedserve bench throughput`` (frontend/bench/throughput.py) with the suite's
settings: --model names a preset (or any model path), --repeats is --num-iters, --out is
--result-file; any other flag of ``pagedserve bench throughput`` passes through.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import resolve_preset
from frontend.bench.cli import main as bench_main

SUITE_FLAGS = [
    "--dataset-name", "shared",
    "--temperature", "0.6",
    "--load-format", "dummy",
    "--skip-tokenizer-init",
    "--max-model-len", "2048",
    "--max-num-batched-tokens", "16384",
]  # fmt: skip


def bench_argv(argv: Sequence[str] | None = None) -> list[str]:
    """The ``pagedserve bench throughput`` arguments for this script's arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama3-8b", help="preset name or model path")
    parser.add_argument("--repeats", default="1", help="timed runs of the workload; the median is reported")
    parser.add_argument("--out", default=None)
    args, rest = parser.parse_known_args(argv)
    out = args.out or str(Path("benchmarks/results") / f"throughput_{args.model}.json")
    return [
        "throughput", *SUITE_FLAGS,
        "--model", resolve_preset(args.model), "--served-model-name", args.model,
        "--num-iters", args.repeats, "--result-file", out, *rest,
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(bench_argv(argv))


if __name__ == "__main__":
    sys.exit(main())
