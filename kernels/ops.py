"""The kernel entry points the model calls.

Each op runs its Triton kernel on CUDA tensors and the plain-torch reference (kernels/reference.py,
same signature) everywhere else. The model never chooses an implementation itself. ``linear`` is
the one way into a GEMM: torch's (cuBLAS on CUDA) on every device, unless the plan measured at
start-up chose another implementation for the shape (kernels/gemm.py).

The Triton modules are imported lazily, on the first CUDA call: ``triton.jit`` reads TRITON_INTERPRET
when a kernel is decorated, and the CPU engine should neither depend on that nor pay for it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from kernels.gemm import GemmPlan, torch_linear
from kernels.reference import (
    apply_token_bitmask_ref,
    fused_add_rms_norm_ref,
    paged_attention_ref,
    rms_norm_ref,
    rope_write_kv_ref,
    sample_race_ref,
    silu_and_mul_ref,
)

_modules: dict[str, ModuleType] = {}


def _triton(name: str) -> ModuleType:
    module = _modules.get(name)
    if module is None:
        module = _modules[name] = importlib.import_module(f"kernels.triton.{name}")
    return module


def linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [M, N], written when given
    plan: GemmPlan | None = None,
) -> torch.Tensor:
    """``x W^T (+ b)``, into ``out`` when given: the GEMM ``plan`` chose for this shape, or torch's."""
    if plan is None:
        return torch_linear(x, weight, bias, out)
    return plan.linear(x, weight, bias, out)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if query.is_cuda:
        return _triton("attention").paged_attention(
            query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out
        )
    return paged_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:
        return _triton("norm").rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        return _triton("norm").fused_add_rms_norm(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return _triton("activation").silu_and_mul(x)
    return silu_and_mul_ref(x)


def rope_write_kv(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> None:
    if query.is_cuda:
        return _triton("rope").rope_write_kv(
            positions, query, key, value, k_cache, v_cache, slot_mapping, cos_sin_cache
        )
    return rope_write_kv_ref(positions, query, key, value, k_cache, v_cache, slot_mapping, cos_sin_cache)


def sample_race(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    rows: torch.Tensor | None = None,
    scratch: bool = False,
) -> torch.Tensor:
    if logits.is_cuda:
        return _triton("sampling").sample_race(logits, temperature, seeds, rows, scratch)
    return sample_race_ref(logits, temperature, seeds, rows, scratch)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    if logits.is_cuda:
        return _triton("sampling").apply_token_bitmask(logits, bitmask, rows)
    return apply_token_bitmask_ref(logits, bitmask, rows)
