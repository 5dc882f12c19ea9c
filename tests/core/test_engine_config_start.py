"""The frontend builds the engine's config before the engine process starts, so building it must
not import torch or transformers (seconds each on a fresh machine, in front of the engine's own
start); the CUDA probe answers without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.cuda_probe import cuda_available, cuda_device_count, torch_has_cuda
from core.engine_args import EngineArgs

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "benchmarks" / "presets" / "llama3-8b"


def test_engine_config_of_a_llama_directory_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\n"
        "from core.engine_args import EngineArgs\n"
        f"config = EngineArgs(model={str(PRESET)!r}, load_format='dummy').create_engine_config()\n"
        "assert config.model.hf_config['num_hidden_layers'] == 32, config.model.hf_config\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules)\n"
        "print('imported:', heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cuda_probe_agrees_with_torch() -> None:
    import torch

    assert torch_has_cuda() == (torch.version.cuda is not None)
    assert cuda_available() == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert cuda_device_count() == torch.cuda.device_count()


@pytest.mark.skipif(cuda_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_refused() -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        EngineArgs(model=str(PRESET), load_format="dummy", device="cuda").create_engine_config()
