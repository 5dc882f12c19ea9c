"""The sampler's cost per step on the GPU: the fused one-pass kernel against the torch path.

    python3 benchmarks/sampler_bench.py --out benchmarks/results/sampler_h200.json

For each (batch, vocab) of the presets' decode steps, temperature 0.6, bf16 logits:
  fused           workers.sampler.sample: kernels.ops.sample_race, one read of the logits
  torch           the normalising path (fp32 copy, softmax, exponential noise, argmax): what every
                  temperature-only batch ran before the fused kernel
  torch_seeded    the same with every row seeded (a generator per row per step, as the shared
                  workload's throughput run asks for seeds)
Each case reports the GPU time (CUDA events around the call) and the wall time of a call followed
by a synchronize (host work included), medians over repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import environment, write_result
from workers.sampler import SamplingMetadata, _sample_truncated, sample

CASES = [(1, 128256), (64, 128256), (256, 128256), (256, 49152)]


def timed(fn, warmup: int, repeats: int) -> tuple[float, float]:
    """(median GPU us, median wall us) per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gpu, wall = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e6)
        gpu.append(start.elapsed_time(end) * 1e3)
    return statistics.median(gpu), statistics.median(wall)


def make_cases(logits: torch.Tensor, temperature: torch.Tensor, seeded: list[tuple[int, int, int]]) -> dict:
    def md(seeds: list[tuple[int, int, int]] | None) -> SamplingMetadata:
        return SamplingMetadata(temperature=temperature, all_greedy=False, seeded_rows=seeds)

    return {
        "fused": lambda: sample(logits, md(None)),
        "fused_seeded": lambda: sample(logits, md(seeded)),
        "torch": lambda: _sample_truncated(logits.float(), md(None)),
        "torch_seeded": lambda: _sample_truncated(logits.float(), md(seeded)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for batch, vocab in CASES:
        logits = torch.randn(batch, vocab, device="cuda").to(torch.bfloat16)
        temperature = torch.full((batch,), 0.6, device="cuda")
        cases = make_cases(logits, temperature, [(i, i, 100) for i in range(batch)])
        for name, fn in cases.items():
            gpu_us, wall_us = timed(fn, args.warmup, args.repeats)
            rows.append({"case": name, "batch": batch, "vocab": vocab, "gpu_us": gpu_us, "wall_us": wall_us})
            print(
                f"{name:14s} batch {batch:4d} vocab {vocab:6d}: GPU {gpu_us:8.1f} us, wall {wall_us:8.1f} us"
            )
    write_result(
        args.out,
        {
            "benchmark": "sampler",
            **environment(),
            "method": "CUDA events around one call; wall = call + synchronize; medians",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
