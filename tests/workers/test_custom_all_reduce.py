"""The custom all-reduce's start-up decision: taken alike on every rank, NCCL/gloo otherwise.

The one-shot kernel itself needs CUDA and peer-addressable GPUs: the GPU TP check
(tests/gpu/tp_check.py) and benchmarks/allreduce_bench.py cover it on the lent machines. Here,
on CPU with gloo, every rank must fall back together, and TPGroup must then reduce through
torch.distributed."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.custom_all_reduce import make_custom_all_reduce
from workers.distributed import TPGroup


def _rank(rank: int, world: int, init: str, dtype: torch.dtype, results: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        custom = make_custom_all_reduce(dist.group.WORLD, world, torch.device("cpu"), dtype)
        tp = TPGroup(rank=rank, size=world, group=dist.group.WORLD, custom_all_reduce=custom)
        x = torch.full((3, 4), float(rank + 1))
        tp.all_reduce(x)
        gathered = tp.all_gather_last_dim(torch.full((2, 3), float(rank)))
        results[rank] = (custom is None, x.tolist(), gathered.tolist())
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_rank_falls_back_together_on_cpu(dtype: torch.dtype) -> None:
    world = 2
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        init = "file://" + os.path.join(tmp, "rendezvous")
        mp.start_processes(_rank, args=(world, init, dtype, results), nprocs=world, start_method="spawn")
        results = dict(results)
    assert sorted(results) == [0, 1]
    for fell_back, reduced, gathered in results.values():
        assert fell_back
        assert reduced == [[3.0] * 4] * 3
        assert gathered == [[0.0] * 3 + [1.0] * 3] * 2
