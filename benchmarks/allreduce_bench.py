"""All-reduce latency between the GPUs of one host, for the message sizes of a TP decode step.

One process per GPU (NCCL, as the engine's workers use it). For each size, the median over
repeats of: an eager ``dist.all_reduce`` (CUDA events around a loop of 50), and the same loop
captured in one CUDA graph and replayed (how the decode step runs it). Where torch's symmetric
memory is available, the engine's one-shot all-reduce (workers/custom_all_reduce.py: torch's
symmetric-memory kernel, peer loads over NVLink, no multicast) is checked against NCCL and timed
the same way.

    python3 benchmarks/allreduce_bench.py --world-size 2 --hidden 8192 --out results/allreduce.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, write_result  # noqa: E402

LOOP = 50
REPEATS = 7


def _time_loop(fn: Any, torch: Any) -> float:
    """Median µs per call of ``fn`` over REPEATS loops of LOOP calls, after a warm-up loop."""
    for _ in range(LOOP):
        fn()
    samples = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(LOOP):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / LOOP)
    return statistics.median(samples)


def _time_graph(fn: Any, torch: Any) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LOOP):
            fn()
    samples = []
    graph.replay()
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / LOOP)
    return statistics.median(samples)


def _rank_main(rank: int, world_size: int, init: str, tokens: list[int], hidden: int, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=init, rank=rank, world_size=world_size, device_id=torch.device("cuda", rank)
    )
    from workers.custom_all_reduce import SymmMemAllReduce

    rows = []
    custom = None
    try:
        custom = SymmMemAllReduce(dist.group.WORLD, torch.device("cuda", rank), torch.bfloat16, 8 << 20)
        check = custom.self_check()
    except Exception as e:  # not every build has symmetric memory; record why
        check = repr(e)[:300]
    for n in tokens:
        x = torch.randn(n, hidden, dtype=torch.bfloat16, device="cuda")
        expected = x.clone()
        dist.all_reduce(expected)
        row: dict[str, Any] = {"tokens": n, "bytes": x.numel() * x.element_size()}

        if custom is not None and check is None:
            # Compared before any timing: the timed loops reduce their input in place over and
            # over, which overflows it (bf16 doubles to inf within ~130 calls).
            got = custom.all_reduce(x.clone())
            torch.cuda.synchronize()
            row["one_shot_max_abs_err_vs_nccl"] = float((got.float() - expected.float()).abs().max())

        timed = x.clone()

        def nccl(timed: torch.Tensor = timed) -> None:
            dist.all_reduce(timed)

        row["nccl_eager_us"] = _time_loop(nccl, torch)
        row["nccl_graph_us"] = _time_graph(nccl, torch)
        if custom is not None and check is None:
            staged = x.clone()

            def one_shot(staged: torch.Tensor = staged) -> None:
                custom.all_reduce(staged)

            row["one_shot_eager_us"] = _time_loop(one_shot, torch)
            row["one_shot_graph_us"] = _time_graph(one_shot, torch)
        rows.append(row)
    rows.append({"one_shot_self_check": check or "passed"})
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_rank_main, args=(r, args.world_size, init, args.tokens, args.hidden, queue))
            for r in range(args.world_size)
        ]
        for p in procs:
            p.start()
        rows = queue.get(timeout=300)
        for p in procs:
            p.join(60)
    record = {
        **environment(),
        "benchmark": "allreduce",
        "world_size": args.world_size,
        "hidden": args.hidden,
        "dtype": "bfloat16",
        "loop": LOOP,
        "repeats": REPEATS,
        "rows": rows,
    }
    if args.out:
        write_result(args.out, record)
    else:
        print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
