"""``y = x W^T (+ b)`` for decode-sized batches: a weight-streaming GEMM (``F.linear`` semantics).

At a few dozen rows a projection is a read of its weight matrix, and the time is how fast the
GPU streams it. cuBLAS does that well for wide matrices (llama3-8b's gate_up at ~3.9 TB/s on an
H200) but not for the narrower ones: qkv (6144 x 4096) and o_proj (4096 x 4096) ran at ~2.1-3.0
TB/s at M = 1-64 (kernels_bench --only linear, kernels_llama3-8b_h200_758ef21.json), because its
tiles give them too few programs to keep every SM's loads in flight.

Design: a program owns ``BLOCK_N`` output columns and one of ``SPLIT_K`` slices of K; it walks its
slice in ``BLOCK_K`` steps, multiplying the (padded) rows of x by the weight tile on the tensor
cores, so each weight byte is read once per call. The split factor is chosen from the shapes so
that the grid holds a few programs per SM. Split partials go to fp32 scratch and a second kernel
adds them in a fixed order (no atomics: the result is the same on every run, as cuBLAS's split-K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.launch import launch, num_sms

# Rows beyond this go to cuBLAS: the GEMM turns compute-bound and its tiles win.
MAX_ROWS = 64
_PROGRAMS_PER_SM = 4
_MAX_SPLIT_K = 16


@dataclass(frozen=True)
class LinearConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@triton.jit(do_not_specialize=["num_rows"])
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    part_ptr,  # fp32 [SPLIT_K, num_rows, N]; only touched when SPLIT_K > 1
    num_rows,
    N,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    m_ok = offs_m < num_rows
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # K_PER_SPLIT is a multiple of BLOCK_K (checked by the caller): no masks on the weight loads.
    for _ in range(0, K_PER_SPLIT, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        w = tl.load(w_ptrs)
        acc = tl.dot(x, tl.trans(w), acc=acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None])
    else:
        rows = (pid_k * num_rows + offs_m).to(tl.int64)
        tl.store(part_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=m_ok[:, None])


@triton.jit(do_not_specialize=["num_rows"])
def _split_k_sum_kernel(
    part_ptr,
    b_ptr,
    y_ptr,
    num_rows,
    N,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(SPLIT_K):  # a fixed order: the sum is the same on every run
        acc += tl.load(part_ptr + (split * num_rows + row).to(tl.int64) * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def choose_config(num_rows: int, out_features: int, in_features: int, sms: int) -> LinearConfig | None:
    """Tiles and split factor from shapes only (graph-safe); None when the shape does not tile."""
    block_n, block_k = 32, 128
    if num_rows > MAX_ROWS or out_features % block_n or in_features % block_k:
        return None
    programs = out_features // block_n
    split_k = 1
    while (
        split_k < _MAX_SPLIT_K
        and programs * split_k < _PROGRAMS_PER_SM * sms
        and in_features % (2 * split_k * block_k) == 0
    ):
        split_k *= 2
    return LinearConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=4)


def skinny_linear_launch(
    x: torch.Tensor,  # [M, K], unit stride along K
    weight: torch.Tensor,  # [N, K], unit stride along K
    bias: torch.Tensor | None,
    out: torch.Tensor | None,  # [M, N], unit stride along N
    config: LinearConfig,
) -> torch.Tensor:
    """The GEMM with explicit tiles (tests and benchmarks pin them)."""
    num_rows, in_features = x.shape
    out_features = weight.shape[0]
    if out is None:
        out = torch.empty((num_rows, out_features), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    k_per_split = in_features // config.split_k
    assert in_features % config.split_k == 0 and k_per_split % config.block_k == 0, "K does not tile"
    assert out_features % config.block_n == 0, "N does not tile"
    assert x.stride(1) == 1 and weight.stride(1) == 1 and out.stride(1) == 1, "needs unit inner strides"
    block_m = max(16, triton.next_power_of_2(num_rows))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    has_bias = bias is not None
    bias_arg = bias if has_bias else out
    part = out
    if config.split_k > 1:
        part = torch.empty((config.split_k, num_rows, out_features), dtype=torch.float32, device=x.device)
    launch(_skinny_linear_kernel, (out_features // config.block_n, config.split_k),
        x, weight, bias_arg, out, part, num_rows, out_features,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=config.split_k, K_PER_SPLIT=k_per_split, DOT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if config.split_k > 1:
        block = 1024
        launch(_split_k_sum_kernel, (num_rows, triton.cdiv(out_features, block)),
            part, bias_arg, out, num_rows, out_features, out.stride(0),
            HAS_BIAS=has_bias, SPLIT_K=config.split_k, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return out


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The skinny GEMM when the shape suits it; None tells the caller to use cuBLAS."""
    if x.dim() != 2 or x.stride(1) != 1 or weight.stride(1) != 1 or (out is not None and out.stride(1) != 1):
        return None
    config = choose_config(x.shape[0], weight.shape[0], x.shape[1], num_sms(x.device))
    if config is None:
        return None
    return skinny_linear_launch(x, weight, bias, out, config)
