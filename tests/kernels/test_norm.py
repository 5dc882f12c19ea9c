"""Triton rms_norm and fused_add_rms_norm against the torch references."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import fused_add_rms_norm_ref, rms_norm_ref
from kernels.triton.norm import fused_add_rms_norm, rms_norm

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(rows: int, hidden: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(device, dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    return x, residual, weight


@pytest.mark.parametrize(("rows", "hidden"), [(5, 576), (3, 100), (1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(rows: int, hidden: int, dtype: torch.dtype) -> None:
    x, _, weight = _inputs(rows, hidden, dtype)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-5), atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_rms_norm_strided_rows_and_3d() -> None:
    x, _, weight = _inputs(6, 96, torch.float32)
    view = x[::2]  # row stride 192: no copy needed
    torch.testing.assert_close(rms_norm(view, weight, 1e-6), rms_norm_ref(view, weight, 1e-6))
    x3 = x.view(2, 3, 96)
    torch.testing.assert_close(rms_norm(x3, weight, 1e-6), rms_norm_ref(x3, weight, 1e-6))


@pytest.mark.parametrize(("rows", "hidden"), [(5, 576), (2, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_add_rms_norm_in_place(rows: int, hidden: int, dtype: torch.dtype) -> None:
    x, residual, weight = _inputs(rows, hidden, dtype)
    x_ref, r_ref = x.clone(), residual.clone()
    fused_add_rms_norm_ref(x_ref, r_ref, weight, 1e-5)
    x_ptr, r_ptr = x.data_ptr(), residual.data_ptr()
    out_x, out_r = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert out_x is x and out_r is residual and x.data_ptr() == x_ptr and residual.data_ptr() == r_ptr
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(residual, r_ref, atol=0, rtol=0)  # one rounding of x + r, as torch
    torch.testing.assert_close(x, x_ref, atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden", [4096, 576])  # llama3-8b, smollm2-135m
@pytest.mark.parametrize("rows", [1, 77, 2048])
def test_gpu_norms_bf16(rows: int, hidden: int) -> None:
    x, residual, weight = _inputs(rows, hidden, torch.bfloat16, device="cuda")
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), atol=2e-2, rtol=2e-2)
    x_ref, r_ref = x.clone(), residual.clone()
    fused_add_rms_norm_ref(x_ref, r_ref, weight, 1e-5)
    fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(residual, r_ref, atol=0, rtol=0)
    torch.testing.assert_close(x, x_ref, atol=2e-2, rtol=2e-2)
