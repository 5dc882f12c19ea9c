"""SiLU-and-mul for a merged gate||up projection (``silu_and_mul_ref`` semantics).

Grid ``(M, cdiv(I, BLOCK))``: rows on the first axis (no 65535 limit there). Casts follow torch:
silu in fp32 rounded to the input dtype, then the product rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.launch import launch

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + row * stride_x
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2I] holding gate || up; returns silu(gate) * up, [..., I]."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, inter)
    if x2.shape[0] > 0 and inter > 0:
        block = min(_BLOCK, triton.next_power_of_2(inter))
        grid = (x2.shape[0], triton.cdiv(inter, block))
        launch(
            _silu_and_mul_kernel,
            grid,
            x2,
            out2,
            x2.stride(0),
            out2.stride(0),
            inter,
            BLOCK=block,
            num_warps=4,
        )
    return out
