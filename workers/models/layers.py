"""Tensor-parallel building blocks: column/row-parallel linears, vocab-parallel embedding and LM head.

Each parameter carries a ``weight_loader`` (a ``weight_loading.ParamLoader``) that knows the full
checkpoint shape of each shard it takes, checks it, and copies this rank's slice of the full tensor
into the parameter, so the model's ``load_weights`` stays a name-mapping loop.
A linear layer's weight parameters and arithmetic are its linear method's (workers/quantization/);
the layer decides only which slice a rank holds and which collective follows.
With ``tp.size == 1`` every layer is a plain linear / embedding and no collective runs.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ipc.config import check_tp_heads
from kernels import ops
from workers.distributed import TPGroup
from workers.models.weight_loading import WHOLE, ParamLoader, set_loader
from workers.quantization import UNQUANTIZED, LinearPartition, QuantizationConfig


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by tensor_parallel_size ({b})")
    return a // b


@dataclass(frozen=True, slots=True)
class OutputShard:
    """One checkpoint tensor of a (possibly fused) projection, as this rank holds its rows."""

    rows: int  # its rows in the checkpoint
    start: int  # the first of them this rank holds
    size: int  # how many this rank holds
    offset: int  # where they sit among this rank's fused output rows


def _fused(parts: list[tuple[Hashable, int, int, int]]) -> dict[Hashable, OutputShard]:
    """(shard id, checkpoint rows, first row held, rows held) in fused order -> the shards."""
    shards: dict[Hashable, OutputShard] = {}
    offset = 0
    for shard, rows, start, size in parts:
        shards[shard] = OutputShard(rows, start, size, offset)
        offset += size
    return shards


class LinearBase(nn.Module):
    """A projection ``y = x W^T (+ b)``. The layer owns the tensor-parallel split (which rows and
    columns of each checkpoint tensor this rank holds; the collective after the GEMM, in the
    subclasses); its ``linear_method`` owns the weight's parameters and the arithmetic.

    Every parameter a method registers (``register_weight``) gets a loader that checks each
    checkpoint tensor's full shape and copies this rank's slice of it along the dimensions the
    method named, whatever the parameter's dtype or layout.
    """

    def __init__(
        self,
        input_size: int,
        input_start: int,
        input_size_per_partition: int,
        shards: dict[Hashable, OutputShard],
        quant_config: QuantizationConfig,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.input_start = input_start
        self.input_size_per_partition = input_size_per_partition
        self.shards = shards
        self.linear_method = quant_config.linear_method()
        partition = LinearPartition(
            input_size=input_size,
            input_size_per_partition=input_size_per_partition,
            output_sizes=tuple(part.rows for part in shards.values()),
            output_sizes_per_partition=tuple(part.size for part in shards.values()),
            params_dtype=torch.get_default_dtype(),
        )
        self.linear_method.create_weights(self, partition)

    def register_weight(
        self, name: str, data: torch.Tensor, *, output_dim: int | None, input_dim: int | None
    ) -> nn.Parameter:
        """See ``workers.quantization.LinearLayer``."""
        if output_dim is None and len(self.shards) > 1:
            raise ValueError(
                f"{type(self).__name__} fuses {len(self.shards)} checkpoint tensors: its parameter "
                f"{name!r} needs an output dimension to hold a slice of each"
            )
        shapes = {}
        for shard, part in self.shards.items():
            full = list(data.shape)
            if output_dim is not None:
                full[output_dim] = part.rows
            if input_dim is not None:
                full[input_dim] = self.input_size
            shapes[shard] = tuple(full)
        copy = functools.partial(self._copy_slice, output_dim=output_dim, input_dim=input_dim)
        # Never trained; and a quantized method's integer parameters could not require gradients.
        param = set_loader(nn.Parameter(data, requires_grad=False), ParamLoader(shapes, copy))
        self.register_parameter(name, param)
        return param

    def _copy_slice(
        self,
        data: torch.Tensor,
        loaded: torch.Tensor,
        shard: Hashable,
        *,
        output_dim: int | None,
        input_dim: int | None,
    ) -> None:
        if output_dim is not None:
            part = self.shards[shard]
            data = data.narrow(output_dim, part.offset, part.size)
            loaded = loaded.narrow(output_dim, part.start, part.size)
        if input_dim is not None:
            loaded = loaded.narrow(input_dim, self.input_start, self.input_size_per_partition)
        data.copy_(loaded)

    def process_after_loading(self) -> None:
        self.linear_method.process_after_loading(self)


class ColumnParallelLinear(LinearBase):
    """Split by output rows: each rank holds ``out/tp`` rows of the weight and computes its slice
    of y; no collective."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPGroup,
        quant_config: QuantizationConfig = UNQUANTIZED,
    ) -> None:
        self.tp = tp
        self.out_per_rank = _divide(out_features, tp.size, "output size")
        super().__init__(in_features, 0, in_features, self._output_shards(out_features), quant_config)
        self.bias = (
            self.register_weight("bias", torch.empty(self.out_per_rank), output_dim=0, input_dim=None)
            if bias
            else None
        )

    def _output_shards(self, out_features: int) -> dict[Hashable, OutputShard]:
        """The checkpoint tensors this projection is made of, and this rank's rows of each."""
        rows = self.out_per_rank
        return _fused([(WHOLE, out_features, self.tp.rank * rows, rows)])

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ b), into ``out`` (a caller's buffer: the same GEMM, no copy) when given."""
        return self.linear_method.apply(self, x, self.bias, out)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one GEMM (gate || up)."""

    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        bias: bool,
        tp: TPGroup,
        quant_config: QuantizationConfig = UNQUANTIZED,
    ) -> None:
        self.total_out_sizes = list(out_sizes)
        self.out_sizes = [_divide(s, tp.size, "output size") for s in out_sizes]
        super().__init__(in_features, sum(out_sizes), bias, tp, quant_config)

    def _output_shards(self, out_features: int) -> dict[Hashable, OutputShard]:
        return _fused(
            [
                (index, total, self.tp.rank * rows, rows)
                for index, (total, rows) in enumerate(zip(self.total_out_sizes, self.out_sizes))
            ]
        )


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one GEMM. Query heads are split across ranks; KV heads are split
    when there are at least as many as ranks, and replicated otherwise (tp a multiple of them)."""

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPGroup,
        quant_config: QuantizationConfig = UNQUANTIZED,
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
        super().__init__(hidden, out, bias, tp, quant_config)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def _output_shards(self, out_features: int) -> dict[Hashable, OutputShard]:
        kv_rows = self.total_num_kv_heads * self.head_dim
        kv_start = (self.tp.rank // self.kv_replicas) * self.kv_size
        return _fused(
            [
                ("q", self.total_num_heads * self.head_dim, self.tp.rank * self.q_size, self.q_size),
                ("k", kv_rows, kv_start, self.kv_size),
                ("v", kv_rows, kv_start, self.kv_size),
            ]
        )


class RowParallelLinear(LinearBase):
    """Split by input columns: each rank holds ``in/tp`` columns of the weight, takes its slice of
    x, and the partial sums are all-reduced."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPGroup,
        quant_config: QuantizationConfig = UNQUANTIZED,
    ) -> None:
        self.tp = tp
        self.in_per_rank = _divide(in_features, tp.size, "input size")
        shards = _fused([(WHOLE, out_features, 0, out_features)])
        super().__init__(in_features, tp.rank * self.in_per_rank, self.in_per_rank, shards, quant_config)
        # The bias is added once, after the all-reduce: every rank holds all of it, a plain load.
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.linear_method.apply(self, x))
        return y + self.bias if self.bias is not None else y


def linear_layers(model: nn.Module) -> Iterator[LinearBase]:
    """Every linear layer of the model (what a linear method runs in)."""
    return (m for m in model.modules() if isinstance(m, LinearBase))


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
        logits = self.tp.all_gather_last_dim(ops.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
