"""The HF ``architectures`` names the engine can build, without importing the model code (the
frontend checks a model before it starts the engine, and must not pay for torch to do so)."""

from __future__ import annotations

# Every entry is built by workers.models.llama.LlamaForCausalLM (see the registry).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def check_architecture(architecture: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
