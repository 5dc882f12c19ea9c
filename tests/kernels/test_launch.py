"""kernels.triton.launch: a launch outside ``parallel_compile`` runs the kernel; inside, it only
compiles its variant (on the pool), and after the block the variant is ready and runs correctly."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import rms_norm_ref
from kernels.triton import norm
from kernels.triton.launch import parallel_compile


def test_launch_runs_the_kernel_outside_the_compile_block() -> None:
    x = torch.randn(3, 64)
    weight = torch.rand(64) + 0.5
    torch.testing.assert_close(norm.rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))


def _compiled_variants(kernel, device: torch.device) -> int:
    return len(kernel.device_caches[device.index][0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_parallel_compile_compiles_without_running() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    # Odd hidden sizes: variants no other test compiled in this process.
    hiddens = (72, 200, 328)
    before = _compiled_variants(norm._rms_norm_kernel, device)
    with parallel_compile(4):  # the outputs are never computed: only the compiles are queued
        for hidden in hiddens:
            norm.rms_norm(torch.randn(5, hidden, device=device), torch.ones(hidden, device=device), 1e-6)
    assert _compiled_variants(norm._rms_norm_kernel, device) >= before + len(hiddens)
    for hidden in hiddens:
        x = torch.randn(5, hidden, device=device)
        weight = torch.rand(hidden, device=device) + 0.5
        torch.testing.assert_close(norm.rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))
    assert _compiled_variants(norm._rms_norm_kernel, device) == before + len(hiddens)  # nothing new
