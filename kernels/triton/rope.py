"""NeoX-style rotary embedding and the KV-cache write in one launch (``rope_write_kv_ref`` semantics).

Grid ``(T, 2)``: per token, both programs load the token's cos/sin row (fp32 cache, cos in the
first half, sin in the second); one rotates the q heads in place, the other rotates the k heads
straight into the token's cache slot and copies its v heads there, in chunks of BLOCK_H heads. q,
k and v may be strided views (slices of the fused qkv projection), the caches strided views too.

One kernel rather than a rope kernel and a cache-write kernel: k is read once and never written
back, and a decode step has one launch per layer fewer. It is faster than the two launches at
decode sizes and slightly slower at long prefills (BENCHMARKS.md, kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.launch import launch


@triton.jit
def _rotate_heads_to(
    src_ptr,
    dst_ptr,
    num_heads,
    stride_sh,
    stride_sd,
    stride_dh,
    stride_dd,
    cos,
    sin,
    offs_half,
    half_ok,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rotate every head of one token from ``src`` into ``dst`` (the same place, or a cache slot:
    each chunk is loaded before it is stored, so ``dst == src`` rotates in place)."""
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & half_ok[None, :]
        s1 = src_ptr + heads[:, None] * stride_sh + offs_half[None, :] * stride_sd
        d1 = dst_ptr + heads[:, None] * stride_dh + offs_half[None, :] * stride_dd
        x1 = tl.load(s1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(s1 + HALF * stride_sd, mask=mask, other=0.0).to(tl.float32)
        tl.store(d1, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(d1 + HALF * stride_dd, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_write_kv_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    cos_sin_ptr,
    num_q_heads,
    num_kv_heads,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    stride_cs,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_half = tl.arange(0, HALF_PAD)
    half_ok = offs_half < HALF
    cs_row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(cs_row + offs_half, mask=half_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_row + HALF + offs_half, mask=half_ok, other=0.0).to(tl.float32)[None, :]
    if tl.program_id(1) == 0:
        q_row = q_ptr + token * stride_qt
        _rotate_heads_to(
            q_row, q_row, num_q_heads, stride_qh, stride_qd, stride_qh, stride_qd,
            cos, sin, offs_half, half_ok, HALF, BLOCK_HQ,
        )  # fmt: skip
    else:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:  # -1: a padding token, nothing to write
            block = slot // PAGE_SIZE
            offset = slot % PAGE_SIZE
            k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs
            _rotate_heads_to(
                k_ptr + token * stride_kt, k_dst, num_kv_heads, stride_kh, stride_kd, stride_kch,
                stride_kcd, cos, sin, offs_half, half_ok, HALF, BLOCK_HK,
            )  # fmt: skip
            offs_d = tl.arange(0, D_PAD)
            v_src = v_ptr + token * stride_vt
            v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs
            for h0 in range(0, num_kv_heads, BLOCK_HK):
                heads = h0 + tl.arange(0, BLOCK_HK)
                mask = (heads < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
                v = tl.load(v_src + heads[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
                tl.store(
                    v_dst + heads[:, None] * stride_vch + offs_d[None, :] * stride_vcd,
                    v.to(v_cache_ptr.dtype.element_ty),
                    mask=mask,
                )


def rope_write_kv(
    positions: torch.Tensor,  # int64 [T]
    query: torch.Tensor,  # [T, Hq, D], rotated in place
    key: torch.Tensor,  # [T, Hkv, D], read only: its rotation goes to the cache
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T], -1 = skip
    cos_sin_cache: torch.Tensor,  # [max_position, D] fp32
) -> None:
    """q rotated in place; the rotation of k, and v, written to the cache slots (-1: skipped)."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    cap = max(1, 2048 // half_pad)
    block_hq = min(triton.next_power_of_2(num_q_heads), cap)
    block_hk = min(triton.next_power_of_2(num_kv_heads), cap)
    num_warps = 8 if block_hq * half_pad >= 2048 else 4
    launch(_rope_write_kv_kernel, (num_tokens, 2),
        positions, query, key, value, k_cache, v_cache, slot_mapping, cos_sin_cache,
        num_q_heads, num_kv_heads,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        cos_sin_cache.stride(0),
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), HALF=half, HALF_PAD=half_pad,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, PAGE_SIZE=k_cache.shape[1],
        num_warps=num_warps,
    )  # fmt: skip
