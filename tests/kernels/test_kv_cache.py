"""Triton write_kv against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import write_kv_ref
from kernels.triton.kv_cache import write_kv


def _case(page_size: int, dtype: torch.dtype, num_kv_heads: int, head_dim: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(page_size + num_kv_heads)
    num_tokens, num_blocks = 11, 7
    # K and V as strided views of one fused projection, as the model produces them.
    qkv = torch.randn(num_tokens, (2 * num_kv_heads + 3) * head_dim, generator=gen).to(device, dtype)
    key = qkv[:, 3 * head_dim : (3 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, (3 + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * page_size, generator=gen)[:num_tokens]
    slots[[2, 5, 10]] = -1  # padding tokens
    cache = torch.full(
        (num_blocks, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device
    )
    return key, value, cache, slots.to(device)


@pytest.mark.parametrize(
    ("page_size", "dtype", "num_kv_heads", "head_dim"),
    [(16, torch.float32, 3, 64), (32, torch.float16, 2, 64), (16, torch.float16, 1, 80)],
)
def test_write_kv_matches_reference(
    page_size: int, dtype: torch.dtype, num_kv_heads: int, head_dim: int
) -> None:
    key, value, cache, slots = _case(page_size, dtype, num_kv_heads, head_dim)
    k_ref, v_ref, k_out, v_out = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    write_kv_ref(key, value, k_ref, v_ref, slots)
    write_kv(key, value, k_out, v_out, slots)
    torch.testing.assert_close(k_out, k_ref, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_out, v_ref, equal_nan=True, atol=0, rtol=0)
    written = (slots >= 0).sum().item() * num_kv_heads * head_dim
    assert torch.isfinite(k_out).sum().item() == written  # nothing beyond the valid slots


def test_write_kv_into_stacked_cache_views() -> None:
    # One [num_blocks, 2, page, Hkv, D] tensor unbound into K and V views (non-contiguous caches).
    key, value, cache, slots = _case(16, torch.float32, 2, 64)
    stacked = torch.full((cache.shape[0], 2, *cache.shape[1:]), float("nan"))
    expected = stacked.clone()
    write_kv_ref(key, value, expected[:, 0], expected[:, 1], slots)
    write_kv(key, value, stacked[:, 0], stacked[:, 1], slots)
    torch.testing.assert_close(stacked, expected, equal_nan=True, atol=0, rtol=0)


def test_write_kv_all_padding_writes_nothing() -> None:
    key, value, cache, slots = _case(16, torch.float32, 2, 64)
    k_out, v_out = cache.clone(), cache.clone()
    write_kv(key, value, k_out, v_out, torch.full_like(slots, -1))
    assert torch.isnan(k_out).all() and torch.isnan(v_out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(8, 128), (3, 64)])
def test_gpu_write_kv_bf16(num_kv_heads: int, head_dim: int) -> None:
    key, value, cache, slots = _case(16, torch.bfloat16, num_kv_heads, head_dim, device="cuda")
    k_ref, v_ref, k_out, v_out = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    write_kv_ref(key, value, k_ref, v_ref, slots)
    write_kv(key, value, k_out, v_out, slots)
    torch.testing.assert_close(k_out, k_ref, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_out, v_ref, equal_nan=True, atol=0, rtol=0)
