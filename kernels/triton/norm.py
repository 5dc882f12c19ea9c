"""RMSNorm and fused residual-add + RMSNorm (``rms_norm_ref`` / ``fused_add_rms_norm_ref`` semantics).

One program per row with the whole row in registers (BLOCK = next_pow2(hidden)): the row is read
once and written once, which is the bandwidth floor. Casts follow HF LlamaRMSNorm exactly: the
variance in fp32, the normalised row rounded to the input dtype, then multiplied by the weight (a
product of two 16-bit floats is exact in fp32, so rounding it once matches torch bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.launch import launch

# One row must fit in one program's registers.
MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_out,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    stride_x,
    stride_r,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    # Round the sum to the residual dtype before normalising, as the in-place reference does.
    s = (x + r).to(residual_ptr.dtype.element_ty)
    tl.store(residual_ptr + row * stride_r + cols, s, mask=mask)
    s32 = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s32 * s32, 0) / n_cols + eps)
    normed = (s32 * rstd).to(residual_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * stride_x + cols, (normed * w).to(x_ptr.dtype.element_ty), mask=mask)


def _launch_params(hidden: int) -> tuple[int, int]:
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds {MAX_HIDDEN}, the one-row-per-program limit")
    block = triton.next_power_of_2(hidden)
    # ~8-16 elements per thread: enough 16-byte loads in flight without spilling.
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 16384 else 32
    return block, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, hidden] view with unit stride along hidden (copies only if it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.shape[-1]
    block, num_warps = _launch_params(hidden)
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out2 = out.view(-1, hidden)
    if x2.shape[0] > 0:
        launch(
            _rms_norm_kernel, (x2.shape[0],),
            x2, weight, out2, x2.stride(0), out2.stride(0), hidden, eps, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- x + residual; x <- rms_norm(residual). Returns (x, residual)."""
    hidden = x.shape[-1]
    block, num_warps = _launch_params(hidden)
    # In place needs views of the caller's storage; inputs that are not row-strided cannot be done.
    x2 = x.view(-1, hidden)
    r2 = residual.view(-1, hidden)
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        raise ValueError("fused_add_rms_norm needs a unit stride along the hidden dimension")
    if x2.shape[0] > 0:
        launch(
            _fused_add_rms_norm_kernel, (x2.shape[0],),
            x2, r2, weight, x2.stride(0), r2.stride(0), hidden, eps, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return x, residual
