"""``y = x W^T (+ b)`` for decode-sized batches: a weight-streaming GEMM (``F.linear`` semantics).

At a few dozen rows a projection is a read of its weight matrix, and its time is how fast the GPU
streams it. cuBLAS does that well for wide matrices but less well for narrower ones such as a
model's qkv and o_proj (``kernels_bench --only linear``; BENCHMARKS.md, kernels).

Design: a program owns ``BLOCK_M`` rows, ``BLOCK_N`` output columns and one of ``split_k`` slices
of K; it walks its slice in ``BLOCK_K`` steps, multiplying the (padded) rows of x by the weight
tile on the tensor cores, so each weight byte is read once per M block. The weight loads are
marked evict-first: they are streamed once, and x (re-read by every column block) stays in L2.
Split partials go to fp32 scratch and a second kernel adds them in a fixed order (no atomics: the
result is the same on every run). ``choose_config`` picks the tiles from the shapes only, so a
CUDA graph captured at a batch size keeps a valid launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.launch import launch

_SHARED_MEMORY_BYTES = 200 * 1024  # Hopper has 227 KB per block; leave room for the epilogue
# Beyond this many rows the GEMM turns compute-bound and cuBLAS's tiles win every shape measured.
MAX_ROWS = 64
# (block_n, block_k, split_k, num_stages): the tiles that won at least one llama3-8b projection at
# 1-64 rows in the H200 sweep (``kernels_bench --only linear_sweep``); the start-up tuning
# (kernels/gemm.py) times each that fits a shape against cuBLAS.
_CANDIDATE_TILES = (
    (32, 256, 1, 5),
    (64, 128, 1, 5),
    (32, 128, 2, 4),
    (64, 256, 2, 4),
    (64, 128, 2, 5),
    (128, 128, 4, 4),
)


@dataclass(frozen=True, slots=True)
class LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    def fits(self, num_rows: int, out_features: int, in_features: int) -> bool:
        """Whether the tiles cover the shape exactly (no masks on the weight) and fit in shared memory."""
        return (
            out_features % self.block_n == 0
            and in_features % (self.split_k * self.block_k) == 0
            and self.block_m >= 16
            and (self.block_m + self.block_n) * self.block_k * 2 * self.num_stages <= _SHARED_MEMORY_BYTES
        )


def candidate_configs(num_rows: int, out_features: int, in_features: int, sms: int) -> list[LinearConfig]:
    """The candidate tiles that cover the shape and give the grid at least half a program per SM."""
    if num_rows > MAX_ROWS:
        return []
    block_m = max(16, triton.next_power_of_2(num_rows))
    configs = []
    for block_n, block_k, split_k, stages in _CANDIDATE_TILES:
        config = LinearConfig(block_m, block_n, block_k, split_k, num_warps=4, num_stages=stages)
        programs = out_features // block_n * split_k
        if config.fits(num_rows, out_features, in_features) and 2 * programs >= sms:
            configs.append(config)
    return configs


@triton.jit(do_not_specialize=["num_rows"])
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    part_ptr,  # fp32 [split_k, num_rows, N]; only touched when SPLIT
    num_rows,
    N,
    k_per_split,  # a multiple of BLOCK_K (checked by the caller): no masks on the weight loads
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # M blocks vary fastest, so the programs that read one weight tile run together and the
    # second M block finds it in L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * k_per_split + tl.arange(0, BLOCK_K)
    m_ok = offs_m < num_rows
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        acc = tl.dot(x, tl.trans(w), acc=acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SPLIT:
        rows = (pid_k * num_rows + offs_m).to(tl.int64)
        tl.store(part_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=m_ok[:, None])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None])


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
    assert config.fits(num_rows, out_features, in_features), f"{config} does not tile {tuple(weight.shape)}"
    assert x.stride(1) == 1 and weight.stride(1) == 1 and out.stride(1) == 1, "needs unit inner strides"
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    has_bias = bias is not None
    bias_arg = bias if has_bias else out
    split = config.split_k > 1
    part = out
    if split:
        part = torch.empty((config.split_k, num_rows, out_features), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_rows, config.block_m), out_features // config.block_n, config.split_k)
    launch(_skinny_linear_kernel, grid,
        x, weight, bias_arg, out, part, num_rows, out_features, in_features // config.split_k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=has_bias, SPLIT=split, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, DOT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split:
        block = 1024
        launch(_split_k_sum_kernel, (num_rows, triton.cdiv(out_features, block)),
            part, bias_arg, out, num_rows, out_features, out.stride(0),
            HAS_BIAS=has_bias, SPLIT_K=config.split_k, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return out
