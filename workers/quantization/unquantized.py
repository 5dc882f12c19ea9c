"""Weights as the checkpoint stores them, in the model's dtype (bf16 / fp16 / fp32).

Each shape's GEMM is the one the worker measured at start-up (kernels/gemm.py: cuBLAS, cuBLASLt
or the Triton weight-streaming GEMM per weight shape and decode batch size); until a plan is
attached, and for every shape it did not measure, torch's (cuBLAS).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kernels import ops
from kernels.gemm import GemmPlan
from workers.quantization.base import LinearLayer, LinearMethod, LinearPartition


@dataclass(slots=True)
class UnquantizedLinearMethod(LinearMethod):
    name: ClassVar[str] = "none"

    plan: GemmPlan = field(default_factory=GemmPlan)

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> UnquantizedLinearMethod:
        return cls()

    def create_weights(self, layer: LinearLayer, partition: LinearPartition) -> None:
        weight = torch.empty(
            partition.output_size_per_partition,
            partition.input_size_per_partition,
            dtype=partition.params_dtype,
        )
        layer.register_weight("weight", weight, output_dim=0, input_dim=1)

    def process_after_loading(self, layer: nn.Module) -> None:
        """Nothing: the checkpoint's [out, in] layout is what the GEMMs read."""

    def apply(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ops.linear(x, layer.weight, bias, out, self.plan)


def _unquantized(layers: Iterable[nn.Module]) -> Iterable[tuple[nn.Module, UnquantizedLinearMethod]]:
    for layer in layers:
        method = layer.linear_method
        if isinstance(method, UnquantizedLinearMethod):
            yield layer, method


def gemm_weights(layers: Iterable[nn.Module]) -> dict[tuple[int, int], list[torch.Tensor]]:
    """The weights of the layers that run the unquantized method, grouped by shape (out, in):
    what the GEMM tuning measures."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for layer, _ in _unquantized(layers):
        groups.setdefault(tuple(layer.weight.shape), []).append(layer.weight)
    return groups


def attach_gemm_plan(layers: Iterable[nn.Module], plan: GemmPlan) -> int:
    """Let every layer that runs the unquantized method run the GEMMs ``plan`` chose; returns how
    many layers that is."""
    count = 0
    for _, method in _unquantized(layers):
        method.plan = plan
        count += 1
    return count
