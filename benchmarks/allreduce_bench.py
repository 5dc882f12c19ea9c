"""All-reduce latency between the GPUs of one host, for the message sizes of a TP decode step.

One process per GPU (NCCL, as the engine's workers use it). For each size, the median over
repeats of: an eager ``dist.all_reduce`` (CUDA events around a loop of 50), and the same loop
captured in one CUDA graph and replayed (how the decode step runs it). Where torch's symmetric
memory is available, its one-shot all-reduce (peer loads over NVLink, no multicast) is timed the
same way, as the candidate for a custom all-reduce.

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
    rows = []
    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        symm = symm_mem
    except ImportError:
        pass
    for n in tokens:
        x = torch.randn(n, hidden, dtype=torch.bfloat16, device="cuda")
        expected = x.clone()
        dist.all_reduce(expected)
        row: dict[str, Any] = {"tokens": n, "bytes": x.numel() * x.element_size()}
        row["nccl_eager_us"] = _time_loop(lambda: dist.all_reduce(x), torch)
        row["nccl_graph_us"] = _time_graph(lambda: dist.all_reduce(x), torch)
        if symm is not None:
            try:
                buf = symm.empty(n, hidden, dtype=torch.bfloat16, device="cuda")
                symm.rendezvous(buf, dist.group.WORLD.group_name)
                out = torch.empty_like(buf)
                buf.copy_(x)
                got = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", dist.group.WORLD.group_name)
                row["symm_one_shot_max_err"] = float((got.float() - expected.float()).abs().max())

                def one_shot(buf=buf, out=out) -> None:
                    torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", dist.group.WORLD.group_name, out)

                row["symm_one_shot_eager_us"] = _time_loop(one_shot, torch)
                row["symm_one_shot_graph_us"] = _time_graph(one_shot, torch)
            except Exception as e:  # not every build has it; record why
                row["symm_one_shot_error"] = repr(e)[:300]
        rows.append(row)
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
