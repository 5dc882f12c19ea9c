"""Triton silu_and_mul against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import silu_and_mul_ref
from kernels.triton.activation import silu_and_mul


@pytest.mark.parametrize(("shape", "dtype"), [((5, 200), torch.float32), ((2, 3, 3072), torch.float16)])
def test_silu_and_mul(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, silu_and_mul_ref(x), atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("inter", [14336, 1536])  # llama3-8b, smollm2-135m
@pytest.mark.parametrize("rows", [1, 333])
def test_gpu_silu_and_mul_bf16(rows: int, inter: int) -> None:
    x = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16) * 4
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=2e-2, rtol=2e-2)
