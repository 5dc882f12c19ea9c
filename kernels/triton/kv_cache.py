"""Write new K/V rows into the paged cache through a slot mapping (``write_kv_ref`` semantics).

Grid ``(T, cdiv(Hkv, BLOCK_H))``: one program copies one token's K and V rows for BLOCK_H heads.
A slot of -1 (padding token, or a padded sequence with nothing to write) makes the program exit.
The copy is pure bandwidth: BLOCK_H * D is sized so each thread moves 16 bytes of K and of V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.launch import launch


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    num_kv_heads,
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
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D_PAD)
    mask = (heads < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]

    k = tl.load(
        key_ptr + token * stride_kt + heads[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask
    )
    v = tl.load(
        value_ptr + token * stride_vt + heads[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask
    )
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs
    k_dst = k_dst + heads[:, None] * stride_kch + offs_d[None, :] * stride_kcd
    v_dst = v_dst + heads[:, None] * stride_vch + offs_d[None, :] * stride_vcd
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T], -1 = skip
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    page_size = k_cache.shape[1]
    d_pad = triton.next_power_of_2(head_dim)
    # About 1-2K elements per program: 8 bf16 (16 bytes) per thread at 4-8 warps.
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // d_pad))
    num_warps = 8 if block_h * d_pad >= 2048 else 4
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    launch(_write_kv_kernel, grid,
        key, value, k_cache, v_cache, slot_mapping, num_kv_heads,
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_H=block_h, PAGE_SIZE=page_size,
        num_warps=num_warps,
    )  # fmt: skip
