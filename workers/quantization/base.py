"""The linear-method interface: what a weight format does inside a linear layer.

A linear layer (workers/models/layers.py) owns its tensor-parallel split: which slice of each
checkpoint tensor this rank holds, and the collective after the GEMM. Its method owns the rest:
which parameters hold the weight and in what dtype and layout (``create_weights``), what happens
to them once the checkpoint is in (``process_after_loading``), and the arithmetic (``apply``).
A weight format (unquantized, FP8, AWQ, ...) or a LoRA wrapper is one method class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class LinearPartition:
    """This rank's part of a linear layer: the sizes a method shapes its parameters by."""

    input_size: int  # the layer's input features, all ranks together
    input_size_per_partition: int  # this rank's input features (fewer only when row-parallel)
    output_sizes: tuple[int, ...]  # rows of each checkpoint tensor the layer fuses (q, k, v / gate, up)
    output_sizes_per_partition: tuple[int, ...]  # this rank's rows of each, in the fused order
    params_dtype: torch.dtype  # the model's dtype

    @property
    def output_size_per_partition(self) -> int:
        return sum(self.output_sizes_per_partition)


class LinearLayer(Protocol):
    """What a method's ``create_weights`` asks of its layer."""

    def register_weight(
        self, name: str, data: torch.Tensor, *, output_dim: int | None, input_dim: int | None
    ) -> nn.Parameter:
        """Register ``data`` (this rank's part, in the checkpoint's layout) as parameter ``name``,
        filled at load time from the checkpoint tensor(s) of the same name: ``output_dim`` is the
        dimension that runs over the layer's output rows (split and fused by the layer's shards),
        ``input_dim`` the one over its input features (split when row-parallel); None where the
        parameter does not extend along that dimension (a bias has no input dimension)."""
        ...


class LinearMethod(ABC):
    """How a linear layer stores its weight and computes ``x W^T (+ b)``. One instance per layer."""

    __slots__ = ()

    # The name a checkpoint's ``quantization_config.quant_method`` gives the format.
    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, settings: Mapping[str, Any]) -> LinearMethod:
        """A method for one layer, from the checkpoint's ``quantization_config`` settings."""

    @abstractmethod
    def create_weights(self, layer: LinearLayer, partition: LinearPartition) -> None:
        """Register the layer's weight parameters (``layer.register_weight``) for ``partition``.
        The bias, when the layer has one, is the layer's, in the model's dtype."""

    @abstractmethod
    def process_after_loading(self, layer: nn.Module) -> None:
        """Bring the loaded parameters into the form ``apply`` reads (repack, transpose, derive
        scales); runs once, after every checkpoint tensor has been copied in."""

    @abstractmethod
    def apply(
        self,
        layer: nn.Module,
        x: torch.Tensor,  # [M, input_size_per_partition]
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,  # [M, output_size_per_partition], written when given
    ) -> torch.Tensor:
        """``x W^T (+ bias)`` in x's dtype, into ``out`` when given (a view of a caller's buffer)."""
