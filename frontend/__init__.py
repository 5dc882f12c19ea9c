"""The user-facing layer: LLM / AsyncLLM clients, the OpenAI server, tokenization and detokenization.

``from frontend import LLM, AsyncLLM, SamplingParams, EngineArgs, AsyncEngineArgs, RequestOutput,
CompletionOutput`` is the public Python surface, named as vLLM's. Importing the package stays light:
each name is imported on first use, and torch only once an engine is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from ipc.sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "LLM",
    "AsyncEngineArgs",
    "AsyncLLM",
    "CompletionOutput",
    "EngineArgs",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]

# Public name -> the module that defines it, imported on first access.
_LAZY = {
    "LLM": "frontend.llm",
    "AsyncLLM": "frontend.async_llm",
    "EngineArgs": "core.engine_args",
    "AsyncEngineArgs": "core.engine_args",
    "RequestOutput": "frontend.outputs",
    "CompletionOutput": "frontend.outputs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'frontend' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
