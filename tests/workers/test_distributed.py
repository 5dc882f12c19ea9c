"""A rank's process groups (workers.distributed): one rank joins nothing and runs no collective;
two CPU ranks join over gloo, keep NCCL's custom all-reduce out, and reduce and gather across
the world; leaving the group leaves torch.distributed uninitialised."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.distributed import ParallelGroups, TPGroup, init_distributed


def test_one_rank_joins_nothing() -> None:
    groups = init_distributed(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        init_method="file:///nonexistent/never-used",
        timeout_s=1.0,
        custom_all_reduce_dtype=torch.float32,
    )
    assert groups == ParallelGroups(tp=TPGroup(), initialized=False)
    assert not dist.is_initialized()
    x = torch.arange(6.0).reshape(2, 3)
    assert groups.tp.all_reduce(x.clone()).equal(x)
    assert groups.tp.all_gather_last_dim(x).equal(x)
    groups.destroy()  # nothing to leave


def _rank(rank: int, world: int, init: str, results: dict) -> None:
    groups = init_distributed(
        rank=rank,
        world_size=world,
        device=torch.device("cpu"),
        init_method=init,
        timeout_s=60.0,
        custom_all_reduce_dtype=torch.float32,  # CPU: gloo for every all-reduce regardless
    )
    tp = groups.tp
    joined = (groups.initialized, dist.is_initialized(), dist.get_world_size(), tp.rank, tp.size)
    x = torch.full((3, 4), float(rank + 1))
    tp.all_reduce(x)
    gathered = tp.all_gather_last_dim(torch.full((2, 1), float(rank)))
    groups.destroy()
    results[rank] = (
        joined,
        tp.custom_all_reduce is None,
        x.tolist(),
        gathered.tolist(),
        dist.is_initialized(),
    )


@pytest.mark.timeout(120)
def test_two_cpu_ranks_join_reduce_and_leave() -> None:
    world = 2
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        init = "file://" + os.path.join(tmp, "rendezvous")
        mp.start_processes(_rank, args=(world, init, results), nprocs=world, start_method="spawn")
        results = dict(results)
    assert sorted(results) == [0, 1]
    for rank, (joined, no_custom, reduced, gathered, still_initialized) in results.items():
        assert joined == (True, True, world, rank, world)
        assert no_custom
        assert reduced == [[1.0 + 2.0] * 4] * 3
        assert gathered == [[0.0, 1.0]] * 2
        assert not still_initialized
