"""Single-stream latency: one request at a time, 128-token prompt, 512 output tokens (greedy,
ignore_eos): time to first token and milliseconds per output token, median over repeats.

    python benchmarks/latency.py --model llama3-8b --out benchmarks/results/latency_llama3-8b_h200.json

A wrapper over ``pagedserve bench latency`` (frontend/bench/latency.py) with a batch of one:
--model names a preset (or any model path), --repeats is --num-iters, --out is --result-file;
any other flag of ``pagedserve bench latency`` passes through.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import resolve_preset
from frontend.bench.cli import main as bench_main


def bench_argv(argv: Sequence[str] | None = None) -> list[str]:
    """The ``pagedserve bench latency`` arguments for this script's arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--repeats", default="5")
    parser.add_argument("--out", default=None)
    args, rest = parser.parse_known_args(argv)
    out = args.out or str(Path("benchmarks/results") / f"latency_{args.model}.json")
    return [
        "latency",
        "--load-format", "dummy", "--skip-tokenizer-init", "--max-num-seqs", "8",
        "--max-model-len", str(args.input_len + args.output_len + 16),
        "--batch-size", "1", "--num-iters-warmup", "1",
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--model", resolve_preset(args.model), "--served-model-name", args.model,
        "--num-iters", args.repeats, "--result-file", out, *rest,
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(bench_argv(argv))


if __name__ == "__main__":
    sys.exit(main())
