"""Tensor-parallel building blocks: column/row-parallel linears, vocab-parallel embedding and LM head.

Each parameter carries a ``weight_loader`` (a ``weight_loading.ParamLoader``) that knows the full
checkpoint shape of each shard it takes, checks it, and copies this rank's slice of the full tensor
into the parameter, so the model's ``load_weights`` stays a name-mapping loop.
With ``tp.size == 1`` every layer is a plain linear / embedding and no collective runs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ipc.config import check_tp_heads
from kernels.gemm import GemmPlan
from workers.distributed import TPGroup
from workers.models.weight_loading import WHOLE, ParamLoader, set_loader


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by tensor_parallel_size ({b})")
    return a // b


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows; each rank holds ``out/tp`` rows; no collective."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.out_per_rank = _divide(out_features, tp.size, "output size")
        rows = self._shard_rows(out_features)
        self.weight = set_loader(
            nn.Parameter(torch.empty(self.out_per_rank, in_features)),
            ParamLoader({shard: (n, in_features) for shard, n in rows.items()}, self._load),
        )
        self.bias = (
            set_loader(
                nn.Parameter(torch.empty(self.out_per_rank)),
                ParamLoader({shard: (n,) for shard, n in rows.items()}, self._load),
            )
            if bias
            else None
        )
        self.gemm = GemmPlan()  # cuBLAS until attach_gemm_plan hands over the measured plan

    def _shard_rows(self, out_features: int) -> dict[Hashable, int]:
        """The checkpoint tensors this projection is made of: shard id -> its full row count."""
        return {WHOLE: out_features}

    def _load(self, data: torch.Tensor, loaded: torch.Tensor, shard: Hashable) -> None:
        rows = data.shape[0]
        data.copy_(loaded.narrow(0, self.tp.rank * rows, rows))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ b), into ``out`` (a caller's buffer: the same GEMM, no copy) when given."""
        return self.gemm.linear(x, self.weight, self.bias, out)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one GEMM (gate || up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup) -> None:
        self.total_out_sizes = list(out_sizes)
        self.out_sizes = [_divide(s, tp.size, "output size") for s in out_sizes]
        super().__init__(in_features, sum(out_sizes), bias, tp)

    def _shard_rows(self, out_features: int) -> dict[Hashable, int]:
        return dict(enumerate(self.total_out_sizes))

    def _load(self, data: torch.Tensor, loaded: torch.Tensor, shard: Hashable) -> None:
        offset = sum(self.out_sizes[:shard])
        rows = self.out_sizes[shard]
        data.narrow(0, offset, rows).copy_(loaded.narrow(0, self.tp.rank * rows, rows))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one GEMM. Query heads are split across ranks; KV heads are split
    when there are at least as many as ranks, and replicated otherwise (tp a multiple of them)."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPGroup
    ) -> None:
        check_tp_heads(num_heads, num_kv_heads, tp.size)
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = num_heads // tp.size
        if num_kv_heads >= tp.size:
            self.num_kv_heads = num_kv_heads // tp.size
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = tp.size // num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden, out, bias, tp)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def _shard_rows(self, out_features: int) -> dict[Hashable, int]:
        kv_rows = self.total_num_kv_heads * self.head_dim
        return {"q": self.total_num_heads * self.head_dim, "k": kv_rows, "v": kv_rows}

    def _load(self, data: torch.Tensor, loaded: torch.Tensor, shard: Hashable) -> None:
        if shard == "q":
            offset, rows, src = 0, self.q_size, self.tp.rank * self.q_size
        else:
            offset = self.q_size + (0 if shard == "k" else self.kv_size)
            rows = self.kv_size
            src = (self.tp.rank // self.kv_replicas) * self.kv_size
        data.narrow(0, offset, rows).copy_(loaded.narrow(0, src, rows))


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; the partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.in_per_rank = _divide(in_features, tp.size, "input size")
        self.weight = set_loader(
            nn.Parameter(torch.empty(out_features, self.in_per_rank)),
            ParamLoader({WHOLE: (out_features, in_features)}, self._load),
        )
        # The bias is added once, after the all-reduce: every rank holds all of it, a plain load.
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.gemm = GemmPlan()

    def _load(self, data: torch.Tensor, loaded: torch.Tensor, shard: Hashable) -> None:
        cols = data.shape[1]
        data.copy_(loaded.narrow(1, self.tp.rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.gemm.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


def _projections(model: nn.Module) -> Iterator[ColumnParallelLinear | RowParallelLinear]:
    return (m for m in model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear))


def linear_weights(model: nn.Module) -> dict[tuple[int, int], list[torch.Tensor]]:
    """Every column- and row-parallel weight of the model, grouped by shape (out, in): what the
    GEMM tuning measures."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for module in _projections(model):
        groups.setdefault(tuple(module.weight.shape), []).append(module.weight)
    return groups


def attach_gemm_plan(model: nn.Module, plan: GemmPlan) -> None:
    """Let every column- and row-parallel linear of the model run the GEMMs ``plan`` chose."""
    for module in _projections(model):
        module.gemm = plan


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across ranks (padded to a multiple of tp)."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = set_loader(
            nn.Parameter(torch.empty(self.per_rank, hidden)),
            ParamLoader({WHOLE: (vocab_size, hidden)}, self._load),
        )

    def _load(self, data: torch.Tensor, loaded: torch.Tensor, shard: Hashable) -> None:
        part = loaded[self.start : self.start + self.per_rank]
        data.zero_()  # the rows past the vocabulary that pad the last rank's slice
        data[: part.shape[0]].copy_(part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mask = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, vocab-split; logits of every rank are gathered (all ranks get all)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
