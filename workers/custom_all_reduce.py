"""A low-latency all-reduce for the small messages of decode steps, over symmetric memory.

NCCL's all-reduce has a fixed cost inside a CUDA graph that dominates the small messages of a
decode step (two per layer); a one-shot all-reduce, where every rank copies its partial sum into a
buffer its peers can address and then reads all of them (peer loads over NVLink, no multicast), is
faster for them, staging copy included (BENCHMARKS.md, tensor parallelism).

The one-shot kernel is torch's (``torch.ops.symm_mem.one_shot_all_reduce_out``): it barriers with
the peers before reading and again after, so the one staging buffer is safe to reuse by the next
call, and it adds the ranks' values in rank order on every rank, so all ranks get bitwise-equal
sums. Messages above ``max_bytes`` (prefill) go to NCCL, whose bandwidth wins there.

Whether to use it is decided once, at start, identically on every rank: it must exist in this
torch build, support the dtype, and pass a self-check against NCCL (eager and in a CUDA graph).
Otherwise every rank stays on NCCL and the log says why.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Largest message (bytes) sent through the one-shot path, by world size: where it stops beating
# NCCL inside CUDA graphs on H200s (benchmarks/allreduce_bench.py; BENCHMARKS.md).
MAX_BYTES = {2: 4 << 20, 4: 2 << 20}
DEFAULT_MAX_BYTES = 1 << 20
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


class SymmMemAllReduce:
    """In-place sum all-reduce of small contiguous tensors through a symmetric staging buffer."""

    def __init__(self, group: Any, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group = group
        self.group_name = group.group_name
        self.dtype = dtype
        self.max_numel = max_bytes // torch.empty((), dtype=dtype).element_size()
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        self._one_shot = torch.ops.symm_mem.one_shot_all_reduce_out

    def can_reduce(self, x: torch.Tensor) -> bool:
        """Depends on the shape and dtype alone, so every rank decides alike."""
        return x.dtype == self.dtype and x.numel() <= self.max_numel and x.is_contiguous()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        staged = self.buffer[: flat.numel()]
        staged.copy_(flat)
        self._one_shot(staged, "sum", self.group_name, flat)
        return x

    def self_check(self) -> str | None:
        """None if the one-shot sums equal NCCL's here, eager and replayed from a CUDA graph;
        otherwise what went wrong. Collective: every rank must call it."""
        rank = dist.get_rank(self.group)
        gen = torch.Generator(device=self.buffer.device).manual_seed(1234 + rank)
        numel = min(self.max_numel, 64 * 4096)
        x = torch.randn(numel, generator=gen, device=self.buffer.device).to(self.dtype)
        expected = x.clone()
        dist.all_reduce(expected, group=self.group)
        eager = self.all_reduce(x.clone())
        static = x.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            self.all_reduce(static.clone())  # warm-up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self.all_reduce(static)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize(x.device)
        tol = 1e-2 * float(expected.float().abs().max()) + 1e-6
        for name, got in (("eager", eager), ("cuda graph", static)):
            if not bool(torch.isfinite(got).all()):
                return f"{name} one-shot all-reduce produced non-finite values"
            err = float((got.float() - expected.float()).abs().max())
            if err > tol:
                return f"{name} one-shot all-reduce differs from NCCL by {err:.3g} (tolerance {tol:.3g})"
        return None


def make_custom_all_reduce(group: Any, world_size: int, device: torch.device, dtype: torch.dtype) -> Any:
    """The one-shot all-reduce if it is available and correct on every rank, else None (NCCL)."""
    reason = None
    fast = None
    if dtype not in SUPPORTED_DTYPES:
        reason = f"the one-shot kernel has no {dtype} variant"
    else:
        try:
            fast = SymmMemAllReduce(group, device, dtype, MAX_BYTES.get(world_size, DEFAULT_MAX_BYTES))
            reason = fast.self_check()
        except Exception as e:  # no symmetric memory in this build or on this machine
            reason = f"{type(e).__name__}: {e}"
    # Every rank must take the same path, or the ranks would wait in different collectives.
    ok = torch.tensor([0 if reason else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if int(ok.item()) == 1:
        logger.info(
            "custom all-reduce: symmetric-memory one-shot for messages up to %d bytes",
            fast.max_numel * fast.buffer.element_size(),
        )
        return fast
    logger.warning(
        "custom all-reduce disabled, NCCL for every all-reduce: %s", reason or "a peer rank failed its check"
    )
    return None
