"""The weight-streaming Triton GEMM against its reference, the plain fp32 matmul ``linear_ref``
(interpreter on CPU, bf16 on GPU); the reference against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import linear_ref
from kernels.triton import linear as skinny


def _case(rows: int, out_features: int, in_features: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(rows * 7 + out_features)
    x = torch.randn(rows, in_features, generator=gen).to(device, dtype)
    weight = (torch.randn(out_features, in_features, generator=gen) / in_features**0.5).to(device, dtype)
    bias = torch.randn(out_features, generator=gen).to(device, dtype)
    return x, weight, bias


@pytest.mark.parametrize(
    ("rows", "block_m", "split_k", "with_bias"),
    [(1, 16, 1, False), (5, 16, 1, True), (16, 16, 2, False), (3, 16, 4, True), (37, 16, 2, True)],
)
def test_skinny_linear_matches_the_reference(rows: int, block_m: int, split_k: int, with_bias: bool) -> None:
    # 37 rows in blocks of 16: three M blocks, the last one partly masked.
    x, weight, bias = _case(rows, 64, 128, torch.float32)
    config = skinny.LinearConfig(block_m, block_n=32, block_k=16, split_k=split_k, num_warps=4, num_stages=1)
    b = bias if with_bias else None
    got = skinny.skinny_linear_launch(x, weight, b, None, config)
    torch.testing.assert_close(got, linear_ref(x, weight, b), atol=1e-4, rtol=1e-4)


def test_skinny_linear_writes_into_a_strided_out_buffer_only() -> None:
    # The model's qkv projection writes into rows of a wider persistent buffer.
    x, weight, _ = _case(4, 32, 64, torch.float32)
    buffer = torch.full((4, 48), float("nan"))
    out = buffer[:, 8:40]
    config = skinny.LinearConfig(16, block_n=16, block_k=32, split_k=2, num_warps=4, num_stages=1)
    skinny.skinny_linear_launch(x, weight, None, out, config)
    torch.testing.assert_close(out, linear_ref(x, weight), atol=1e-4, rtol=1e-4)
    assert torch.isnan(buffer[:, :8]).all() and torch.isnan(buffer[:, 40:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_is_f_linear_in_x_dtype(dtype: torch.dtype) -> None:
    # Against float64: the fp32 accumulation keeps even the fp16 result within rounding.
    x, weight, bias = _case(6, 48, 96, dtype)
    got = linear_ref(x, weight, bias)
    assert got.dtype == dtype
    torch.testing.assert_close(got, F.linear(x.double(), weight.double(), bias.double()).to(dtype))
    out = torch.empty(6, 48, dtype=dtype)
    assert linear_ref(x, weight, None, out) is out
    torch.testing.assert_close(out, F.linear(x.double(), weight.double()).to(dtype))


def test_split_k_sum_is_the_same_on_every_run() -> None:
    x, weight, _ = _case(7, 32, 256, torch.float32)
    config = skinny.LinearConfig(16, block_n=32, block_k=32, split_k=4, num_warps=4, num_stages=1)
    first = skinny.skinny_linear_launch(x, weight, None, None, config)
    assert torch.equal(first, skinny.skinny_linear_launch(x, weight, None, None, config))


def test_config_fits_only_shapes_it_tiles_exactly() -> None:
    config = skinny.LinearConfig(16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=4)
    assert config.fits(8, 4096, 4096)
    assert not config.fits(8, 4096 + 32, 4096)  # N does not tile
    assert not config.fits(8, 4096, 4096 + 128)  # K does not split into whole steps
    deep = skinny.LinearConfig(128, block_n=128, block_k=256, split_k=1, num_warps=8, num_stages=5)
    assert not deep.fits(128, 4096, 4096)  # 640 KB of stages: more shared memory than an SM has
