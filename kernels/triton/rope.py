"""NeoX-style rotary embedding applied in place to q and k (``apply_rope_ref`` semantics).

Grid ``(T,)``: one program per token loads the token's cos/sin row once (fp32 cache, cos in the
first half, sin in the second) and rotates every q head, then every k head, in chunks of BLOCK_H
heads. q and k may be strided views (e.g. slices of a fused qkv projection); they are updated
through their strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.launch import launch


@triton.jit
def _rotate_heads(
    x_ptr,
    num_heads,
    stride_h,
    stride_d,
    cos,
    sin,
    offs_half,
    half_ok,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & half_ok[None, :]
        p1 = x_ptr + heads[:, None] * stride_h + offs_half[None, :] * stride_d
        p2 = p1 + HALF * stride_d
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(p2, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    num_q_heads,
    num_kv_heads,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_cs,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_half = tl.arange(0, HALF_PAD)
    half_ok = offs_half < HALF
    cs_row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(cs_row + offs_half, mask=half_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_row + HALF + offs_half, mask=half_ok, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(
        q_ptr + token * stride_qt,
        num_q_heads,
        stride_qh,
        stride_qd,
        cos,
        sin,
        offs_half,
        half_ok,
        HALF,
        BLOCK_HQ,
    )
    _rotate_heads(
        k_ptr + token * stride_kt,
        num_kv_heads,
        stride_kh,
        stride_kd,
        cos,
        sin,
        offs_half,
        half_ok,
        HALF,
        BLOCK_HK,
    )


def apply_rope(
    positions: torch.Tensor,  # int64 [T]
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_position, D] fp32
) -> None:
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    # Up to 2K elements per half per chunk: Llama-3-8B rotates its 32 q heads in one pass.
    cap = max(1, 2048 // half_pad)
    block_hq = min(triton.next_power_of_2(num_q_heads), cap)
    block_hk = min(triton.next_power_of_2(num_kv_heads), cap)
    num_warps = 8 if block_hq * half_pad >= 2048 else 4
    launch(_rope_kernel, (num_tokens,),
        positions, query, key, cos_sin_cache, num_q_heads, num_kv_heads,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        cos_sin_cache.stride(0),
        HALF=half, HALF_PAD=half_pad, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        num_warps=num_warps,
    )  # fmt: skip
