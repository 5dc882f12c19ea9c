"""kernels.ops routes CPU tensors to the references without importing (or compiling) Triton code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import ops

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_ops_use_references_and_never_import_triton_modules() -> None:
    script = """
import sys, torch
from kernels import ops
x = torch.randn(3, 8)
ops.rms_norm(x, torch.ones(8), 1e-6)
ops.silu_and_mul(x)
assert not [m for m in sys.modules if m.startswith("kernels.triton")], sys.modules.keys()
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)


def test_cpu_ops_match_references() -> None:
    x = torch.randn(4, 16)
    torch.testing.assert_close(ops.silu_and_mul(x), torch.nn.functional.silu(x[:, :8]) * x[:, 8:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ops_route_to_triton() -> None:
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    ops.rms_norm(x, torch.ones(64, device="cuda", dtype=torch.bfloat16), 1e-6)
    assert "kernels.triton.norm" in sys.modules
