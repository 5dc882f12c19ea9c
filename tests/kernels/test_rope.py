"""Triton rope_write_kv (NeoX rotation of q in place, rotated k and v into the paged cache) against
the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import apply_rope_ref, build_rope_cache, rope_write_kv_ref
from kernels.triton.rope import rope_write_kv

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _case(num_tokens: int, hq: int, hkv: int, head_dim: int, dtype: torch.dtype, device: str = "cpu"):
    """q and k as strided views of one fused qkv projection, as the model hands them over."""
    gen = torch.Generator().manual_seed(num_tokens + hq)
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * head_dim, generator=gen).to(device, dtype)
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(num_tokens, hkv, head_dim)
    positions = torch.randint(0, 500, (num_tokens,), generator=gen).to(device)
    return qkv, q, k, positions


def _fused_case(hq: int, hkv: int, head_dim: int, page_size: int, dtype: torch.dtype, device: str = "cpu"):
    """_case plus v, a NaN-filled cache and a slot mapping with padding tokens."""
    qkv, q, k, positions = _case(9, hq, hkv, head_dim, dtype, device)
    v = qkv[:, (hq + hkv) * head_dim :].view(9, hkv, head_dim)
    gen = torch.Generator().manual_seed(hkv)
    num_blocks = 4
    slots = torch.randperm(num_blocks * page_size, generator=gen)[:9]
    slots[[1, 6]] = -1
    cache = torch.full((num_blocks, page_size, hkv, head_dim), float("nan"), dtype=dtype, device=device)
    return qkv, q, k, v, positions, cache, slots.to(device)


def _run_both(qkv, q, k, v, positions, cache, slots, rope_cache):
    """The reference on a copy of the projection, the kernel on the projection itself: (the
    expected projection, reference caches, kernel caches)."""
    expected_qkv = qkv.clone()
    widths = [q.shape[1] * q.shape[2], k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]]
    views = [part.view_as(x) for part, x in zip(expected_qkv.split(widths, dim=1), (q, k, v))]
    k_ref, v_ref, k_out, v_out = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    rope_write_kv_ref(positions, *views, k_ref, v_ref, slots, rope_cache)
    rope_write_kv(positions, q, k, v, k_out, v_out, slots, rope_cache)
    return expected_qkv, k_ref, v_ref, k_out, v_out


@pytest.mark.parametrize(
    ("hq", "hkv", "head_dim", "page_size", "dtype", "scaling"),
    [
        (9, 3, 64, 16, torch.float32, None),  # smollm2 heads
        (4, 1, 64, 4, torch.float16, LLAMA3_SCALING),
        (3, 3, 48, 8, torch.float32, None),  # padded lanes and heads
    ],
)
def test_rope_write_kv_matches_reference(
    hq: int, hkv: int, head_dim: int, page_size: int, dtype: torch.dtype, scaling: dict | None
) -> None:
    rope_cache = build_rope_cache(head_dim, 512, 10000.0, scaling)
    qkv, q, k, v, positions, cache, slots = _fused_case(hq, hkv, head_dim, page_size, dtype)
    expected_qkv, k_ref, v_ref, k_out, v_out = _run_both(qkv, q, k, v, positions, cache, slots, rope_cache)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    # q rotated in place; k and v of the projection left as they were.
    torch.testing.assert_close(qkv, expected_qkv, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, hq * head_dim :], expected_qkv[:, hq * head_dim :])
    torch.testing.assert_close(k_out, k_ref, equal_nan=True, atol=tol, rtol=tol)
    torch.testing.assert_close(v_out, v_ref, equal_nan=True, atol=0, rtol=0)
    written = int((slots >= 0).sum()) * hkv * head_dim
    assert int(torch.isfinite(k_out).sum()) == written == int(torch.isfinite(v_out).sum())
    # The reference itself: the cached k is the rotation of the token's k (apply_rope_ref's).
    rotated_q, rotated_k = q.clone(), k.clone()
    apply_rope_ref(positions, rotated_q, rotated_k, rope_cache)
    token = int(torch.nonzero(slots >= 0)[0])
    slot = int(slots[token])
    torch.testing.assert_close(k_ref[slot // page_size, slot % page_size], rotated_k[token])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("hq", "hkv", "head_dim"), [(32, 8, 128), (9, 3, 64)])
def test_gpu_rope_write_kv_bf16(hq: int, hkv: int, head_dim: int) -> None:
    rope_cache = build_rope_cache(head_dim, 4096, 500000.0, LLAMA3_SCALING, device="cuda")
    qkv, q, k, v, positions, cache, slots = _fused_case(hq, hkv, head_dim, 16, torch.bfloat16, "cuda")
    expected_qkv, k_ref, v_ref, k_out, v_out = _run_both(qkv, q, k, v, positions, cache, slots, rope_cache)
    torch.testing.assert_close(qkv, expected_qkv, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k_out, k_ref, equal_nan=True, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(v_out, v_ref, equal_nan=True, atol=0, rtol=0)


def test_rope_write_kv_into_stacked_cache_views() -> None:
    # One [num_blocks, 2, page, Hkv, D] tensor unbound into K and V views (non-contiguous caches).
    rope_cache = build_rope_cache(64, 512, 10000.0, None)
    _, q, k, v, positions, cache, slots = _fused_case(4, 2, 64, 16, torch.float32)
    stacked = torch.full((cache.shape[0], 2, *cache.shape[1:]), float("nan"))
    expected = stacked.clone()
    rope_write_kv_ref(positions, q.clone(), k, v, expected[:, 0], expected[:, 1], slots, rope_cache)
    rope_write_kv(positions, q, k, v, stacked[:, 0], stacked[:, 1], slots, rope_cache)
    torch.testing.assert_close(stacked, expected, equal_nan=True, atol=1e-5, rtol=1e-5)


def test_rope_write_kv_of_padding_tokens_writes_no_cache_slot() -> None:
    rope_cache = build_rope_cache(64, 512, 10000.0, None)
    _, q, k, v, positions, cache, slots = _fused_case(4, 2, 64, 16, torch.float32)
    k_out, v_out = cache.clone(), cache.clone()
    expected_q = q.clone()
    apply_rope_ref(positions, expected_q, k.clone(), rope_cache)
    rope_write_kv(positions, q, k, v, k_out, v_out, torch.full_like(slots, -1), rope_cache)
    assert torch.isnan(k_out).all() and torch.isnan(v_out).all()
    torch.testing.assert_close(q, expected_q, atol=1e-5, rtol=1e-5)  # q is rotated all the same
