"""The weight-streaming Triton GEMM against F.linear (interpreter on CPU, bf16 on GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import ops
from kernels.triton import linear as skinny


def _case(rows: int, out_features: int, in_features: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(rows * 7 + out_features)
    x = torch.randn(rows, in_features, generator=gen).to(device, dtype)
    weight = (torch.randn(out_features, in_features, generator=gen) / in_features**0.5).to(device, dtype)
    bias = torch.randn(out_features, generator=gen).to(device, dtype)
    return x, weight, bias


@pytest.mark.parametrize(
    ("rows", "split_k", "with_bias"),
    [(1, 1, False), (5, 1, True), (16, 2, False), (3, 4, True)],
)
def test_skinny_linear_matches_f_linear(rows: int, split_k: int, with_bias: bool) -> None:
    x, weight, bias = _case(rows, 64, 128, torch.float32)
    config = skinny.LinearConfig(block_n=32, block_k=16, split_k=split_k, num_warps=4, num_stages=1)
    b = bias if with_bias else None
    got = skinny.skinny_linear_launch(x, weight, b, None, config)
    torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-4, rtol=1e-4)


def test_skinny_linear_writes_into_a_strided_out_buffer_only() -> None:
    # The model's qkv projection writes into rows of a wider persistent buffer.
    x, weight, _ = _case(4, 32, 64, torch.float32)
    buffer = torch.full((4, 48), float("nan"))
    out = buffer[:, 8:40]
    config = skinny.LinearConfig(block_n=16, block_k=32, split_k=2, num_warps=4, num_stages=1)
    skinny.skinny_linear_launch(x, weight, None, out, config)
    torch.testing.assert_close(out, F.linear(x, weight), atol=1e-4, rtol=1e-4)
    assert torch.isnan(buffer[:, :8]).all() and torch.isnan(buffer[:, 40:]).all()


def test_split_k_sum_is_the_same_on_every_run() -> None:
    x, weight, _ = _case(7, 32, 256, torch.float32)
    config = skinny.LinearConfig(block_n=32, block_k=32, split_k=4, num_warps=4, num_stages=1)
    first = skinny.skinny_linear_launch(x, weight, None, None, config)
    assert torch.equal(first, skinny.skinny_linear_launch(x, weight, None, None, config))


def test_choose_config_tiles_only_decode_sized_divisible_shapes() -> None:
    config = skinny.choose_config(64, 4096, 4096, 132)
    assert config is not None
    assert 4096 % config.block_n == 0 and 4096 % (config.split_k * config.block_k) == 0
    assert skinny.choose_config(skinny.MAX_ROWS + 1, 4096, 4096, 132) is None  # cuBLAS's regime
    assert skinny.choose_config(8, 4096 + 8, 4096, 132) is None  # N does not tile
    assert skinny.choose_config(8, 4096, 4096 + 8, 132) is None  # K does not tile


def test_ops_linear_on_cpu_is_f_linear_with_an_out_buffer() -> None:
    x, weight, bias = _case(3, 8, 16, torch.float32)
    out = torch.empty(3, 8)
    assert ops.linear(x, weight, bias, out) is out
    torch.testing.assert_close(out, F.linear(x, weight, bias))
    torch.testing.assert_close(ops.linear(x, weight), F.linear(x, weight))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 13, 64, 65])
@pytest.mark.parametrize(("out_features", "in_features"), [(6144, 4096), (4096, 4096), (4096, 14336)])
def test_gpu_ops_linear_bf16(rows: int, out_features: int, in_features: int) -> None:
    x, weight, bias = _case(rows, out_features, in_features, torch.bfloat16, "cuda")
    expected = F.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(ops.linear(x, weight, bias).float(), expected, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(ops.linear(x, weight).float(), expected - bias.float(), atol=3e-2, rtol=2e-2)
