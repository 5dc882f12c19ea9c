"""Triton apply_rope (in place, NeoX style) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import apply_rope_ref, build_rope_cache
from kernels.triton.rope import apply_rope

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


@pytest.mark.parametrize(
    ("hq", "hkv", "head_dim", "dtype", "scaling"),
    [
        (9, 3, 64, torch.float32, None),  # smollm2 heads
        (4, 1, 64, torch.float16, LLAMA3_SCALING),
        (3, 3, 48, torch.float32, None),  # half width 24: padded lanes
    ],
)
def test_rope_matches_reference(
    hq: int, hkv: int, head_dim: int, dtype: torch.dtype, scaling: dict | None
) -> None:
    cache = build_rope_cache(head_dim, 512, 10000.0, scaling)
    qkv, q, k, positions = _case(7, hq, hkv, head_dim, dtype)
    expected = qkv.clone()
    q_ref = expected[:, : hq * head_dim].view_as(q)
    k_ref = expected[:, hq * head_dim : (hq + hkv) * head_dim].view_as(k)
    apply_rope_ref(positions, q_ref, k_ref, cache)
    apply_rope(positions, q, k, cache)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    # The whole buffer: q and k rotated, v untouched.
    torch.testing.assert_close(qkv, expected, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("hq", "hkv", "head_dim"), [(32, 8, 128), (9, 3, 64)])
def test_gpu_rope_bf16(hq: int, hkv: int, head_dim: int) -> None:
    cache = build_rope_cache(head_dim, 4096, 500000.0, LLAMA3_SCALING, device="cuda")
    qkv, q, k, positions = _case(300, hq, hkv, head_dim, torch.bfloat16, device="cuda")
    expected = qkv.clone()
    q_ref = expected[:, : hq * head_dim].view_as(q)
    k_ref = expected[:, hq * head_dim : (hq + hkv) * head_dim].view_as(k)
    apply_rope_ref(positions, q_ref, k_ref, cache)
    apply_rope(positions, q, k, cache)
    torch.testing.assert_close(qkv, expected, atol=2e-2, rtol=2e-2)
