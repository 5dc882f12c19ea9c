"""A rank's process groups: the default torch.distributed group and the parallel groups on it.

Ranks talk over NCCL on CUDA and gloo on CPU. Each parallel dimension has a group object that the
model's layers take (``TPGroup`` for tensor parallelism); ``ParallelGroups`` holds a rank's groups,
one per dimension. Every rank is in one tensor-parallel group spanning the world, as the executors
run one pipeline stage. Small tensor-parallel all-reduces on CUDA go through the one-shot kernel of
``workers.custom_all_reduce`` when it passes its start-up check on every rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from workers.custom_all_reduce import make_custom_all_reduce


@dataclass(frozen=True, slots=True)
class TPGroup:
    """A rank's tensor-parallel group: where it sits, and the collectives the layers run over it.
    The default (size one) runs no collective."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup when size > 1
    # workers.custom_all_reduce.SymmMemAllReduce for small messages on CUDA, or None (NCCL/gloo)
    custom_all_reduce: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            custom = self.custom_all_reduce
            if custom is not None and custom.can_reduce(x):
                return custom.all_reduce(x)
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        x = x.contiguous()
        if x.is_cuda:  # one gather into one buffer, then the ranks' slices side by side
            out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)
            return out.movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True, slots=True)
class ParallelGroups:
    """A rank's groups, one per parallel dimension. ``initialized``: this rank joined the default
    process group (world size above one) and must leave it (:meth:`destroy`)."""

    tp: TPGroup = field(default_factory=TPGroup)
    initialized: bool = False

    def destroy(self) -> None:
        """Leave the default process group; the groups are unusable after."""
        if self.initialized:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def init_distributed(
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    init_method: str,
    timeout_s: float,
    custom_all_reduce_dtype: torch.dtype | None,
) -> ParallelGroups:
    """Join the default process group (NCCL on CUDA, gloo on CPU) and build this rank's groups.
    Collective: every rank of the world calls it. With ``world_size == 1`` nothing is joined.

    ``custom_all_reduce_dtype``: the dtype of the activations the tensor-parallel all-reduces
    carry, to try the one-shot all-reduce for them (CUDA only); None keeps every all-reduce on NCCL.
    """
    if world_size == 1:
        return ParallelGroups()
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    try:
        custom = None
        if backend == "nccl" and custom_all_reduce_dtype is not None:
            custom = make_custom_all_reduce(dist.group.WORLD, world_size, device, custom_all_reduce_dtype)
        tp = TPGroup(rank=rank, size=world_size, group=dist.group.WORLD, custom_all_reduce=custom)
    except BaseException:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise
    return ParallelGroups(tp=tp, initialized=True)
