"""GEMM selection: the choice rule, the plan's dispatch through ``ops.linear``, and the wiring into
the unquantized linear method (CPU; the Triton choice runs in the interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import gemm, ops
from kernels.triton.linear import LinearConfig, candidate_configs
from workers.distributed import TPGroup
from workers.models.layers import ColumnParallelLinear, RowParallelLinear, linear_layers
from workers.quantization import attach_gemm_plan, gemm_weights

_TILE = LinearConfig(16, block_n=16, block_k=16, split_k=2, num_warps=4, num_stages=1)


def _choices() -> list[gemm.GemmChoice]:
    return [gemm.GemmChoice(gemm.CUBLAS), gemm.GemmChoice(gemm.CUBLASLT), gemm.GemmChoice(gemm.TRITON, _TILE)]


def test_choose_takes_the_fastest_only_when_it_clearly_beats_cublas() -> None:
    def timed(times: dict[str, float]):
        return lambda choice: times[choice.backend]

    best, timings = gemm.choose(_choices(), timed({"cublas": 10.0, "cublaslt": 9.0, "triton": 9.5}))
    assert best.backend == gemm.CUBLASLT and timings["cublaslt"] == 9.0
    # 1 % faster is within the measurement's noise: cuBLAS stays.
    best, _ = gemm.choose(_choices(), timed({"cublas": 10.0, "cublaslt": 9.9, "triton": 10.5}))
    assert best.backend == gemm.CUBLAS


def test_choose_skips_a_candidate_whose_launch_fails() -> None:
    def measure(choice: gemm.GemmChoice) -> float:
        if choice.backend == gemm.TRITON:
            raise RuntimeError("out of resources: shared memory")
        return {"cublas": 10.0, "cublaslt": 8.0}[choice.backend]

    best, timings = gemm.choose(_choices(), measure)
    assert best.backend == gemm.CUBLASLT
    assert not any(name.startswith("triton") for name in timings)


def _counting(launches: list[str]) -> type[gemm.GemmChoice]:
    """A choice class that records each launch in ``launches``."""

    class Counting(gemm.GemmChoice):
        def run(self, *args):
            launches.append(self.backend)
            return gemm.GemmChoice.run(self, *args)

    return Counting


def test_plan_runs_the_chosen_gemm_for_its_shape_and_cublas_for_others() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    launches: list[str] = []
    plan = gemm.GemmPlan({(3, 32, 64): _counting(launches)(gemm.TRITON, _TILE)})
    torch.testing.assert_close(ops.linear(x, weight, plan=plan), F.linear(x, weight), atol=1e-4, rtol=1e-4)
    assert launches == ["triton"]
    out = torch.empty(4, 32)
    assert ops.linear(torch.cat([x, x[:1]]), weight, out=out, plan=plan) is out  # 4 rows: not in the plan
    assert launches == ["triton"]
    torch.testing.assert_close(out[:3], F.linear(x, weight), atol=1e-4, rtol=1e-4)
    # A transposed input has no unit inner stride: cuBLAS, never the Triton kernel.
    ops.linear(torch.randn(64, 3, generator=gen).t(), weight, plan=plan)
    assert launches == ["triton"]


def test_torch_linear_writes_into_a_callers_buffer() -> None:
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(5, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8)
    for b in (None, bias):
        buffer = torch.full((5, 12), float("nan"))
        out = buffer[:, 2:10]
        assert ops.linear(x, weight, b, out) is out
        torch.testing.assert_close(out, F.linear(x, weight, b))
        assert torch.isnan(buffer[:, :2]).all() and torch.isnan(buffer[:, 10:]).all()
        torch.testing.assert_close(ops.linear(x, weight, b), F.linear(x, weight, b))


def test_candidates_cover_decode_sizes_only() -> None:
    configs = candidate_configs(1, 4096, 4096, 132)
    assert configs and all(c.block_m == 16 and c.fits(1, 4096, 4096) for c in configs)
    assert all(c.block_m == 64 for c in candidate_configs(33, 4096, 14336, 132))
    assert candidate_configs(65, 4096, 4096, 132) == []  # compute-bound: cuBLAS's regime
    assert candidate_configs(8, 4096 + 8, 4096, 132) == []  # no tile covers N


def test_past_l2_repeats_small_weights_until_a_pass_misses_the_cache() -> None:
    small = [torch.zeros(256, 256, dtype=torch.bfloat16)]  # 128 KB
    repeated = gemm._past_l2(small, min_bytes=1 << 20)
    assert len(repeated) == 8 and repeated[0] is small[0]
    assert repeated[1].data_ptr() != small[0].data_ptr()
    big = [torch.zeros(1024, 1024, dtype=torch.bfloat16)]  # 2 MB
    assert gemm._past_l2(big, min_bytes=1 << 20) == big


def test_small_weights_are_not_tuned() -> None:
    # Runs on CPU: nothing is timed (no CUDA call) when every weight is under the threshold.
    weights = {(576, 576): [torch.zeros(576, 576, dtype=torch.bfloat16)] * 30}
    assert gemm.tune_gemm_plan(weights, [1, 8, 64], compile_threads=1).choices == {}


def test_attach_gemm_plan_reaches_every_unquantized_linear() -> None:
    tp = TPGroup()
    model = torch.nn.Sequential(
        ColumnParallelLinear(64, 32, False, tp),
        RowParallelLinear(32, 64, False, tp),
        ColumnParallelLinear(64, 32, True, tp),
    )
    for param in model.parameters():
        torch.nn.init.normal_(param)
    layers = list(linear_layers(model))
    groups = gemm_weights(layers)
    assert sorted(groups) == [(32, 64), (64, 32)] and len(groups[(32, 64)]) == 2
    launches: list[str] = []
    plan = gemm.GemmPlan({(2, 32, 64): _counting(launches)(gemm.TRITON, _TILE)})
    assert attach_gemm_plan(layers, plan) == 3
    assert all(layer.linear_method.plan is plan for layer in model)
    # The layer's forward runs the plan's choice for the shape it measured.
    x = torch.randn(2, 64)
    torch.testing.assert_close(model[2](x), F.linear(x, model[2].weight, model[2].bias), atol=1e-4, rtol=1e-4)
    assert launches == ["triton"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tuned_plan_matches_f_linear() -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(6144, 4096), (4096, 14336)]
    weights = {
        s: [(torch.randn(*s, generator=gen) / s[1] ** 0.5).to("cuda", torch.bfloat16) for _ in range(2)]
        for s in shapes
    }
    sizes = [1, 16, 64, 128]
    plan = gemm.tune_gemm_plan(weights, sizes, compile_threads=4)
    for (_, k), ws in weights.items():
        for rows in sizes:
            x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
            expected = F.linear(x.float(), ws[0].float())
            torch.testing.assert_close(plan.linear(x, ws[0]).float(), expected, atol=3e-2, rtol=2e-2)
