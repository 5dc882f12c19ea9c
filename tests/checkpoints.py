"""Tiny random-weight HF checkpoints for tests, built and written by HF transformers itself.

A test names what its model needs (architecture, config values that give the test its meaning, a
seed, how the weights are redrawn, a tokenizer) and gets the same bytes on every run: the weights
come from HF's own initialisation under ``torch.manual_seed(seed)``, then, with a :class:`Redraw`,
from draws in parameter order. Configs start from :data:`TINY` and take the test's overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

# The architectures the engine serves, by the name a test passes as ``arch``.
CONFIG_CLASSES: dict[str, type[transformers.PretrainedConfig]] = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
}

# Two layers, 4 query heads over 2 KV heads (GQA, and both split in two for TP=2), untied head.
TINY: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


@dataclass(frozen=True, slots=True)
class Redraw:
    """Weights drawn again after HF's initialisation, in parameter order: matrices from
    N(0, matrix_std), vectors (norm weights and biases) from N(vector_mean, vector_std); a kind
    whose std is None keeps HF's values and consumes no random numbers."""

    matrix_std: float | None = None
    vector_mean: float = 0.0
    vector_std: float | None = None

    def apply(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() > 1:
                    if self.matrix_std is not None:
                        param.normal_(0.0, self.matrix_std)
                elif self.vector_std is not None:
                    param.normal_(self.vector_mean, self.vector_std)


# Sharper logits than HF's init, so greedy comparisons meet no argmax near-ties.
SHARP = Redraw(matrix_std=0.2, vector_mean=1.0, vector_std=0.1)
# HF starts every norm weight at exactly 1; random ones make a mix-up between norms visible.
RANDOM_VECTORS = Redraw(vector_std=1.0)


@dataclass(frozen=True, slots=True)
class TinyCheckpoint:
    path: Path
    config: transformers.PretrainedConfig
    model: torch.nn.Module  # the HF model whose weights the checkpoint holds, in eval mode

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the checkpoint's tensors, by HF name."""
        return _copy(self.model)


def _copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Clones: a tied head's tensor shares the embedding's storage, which safetensors refuses.
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def tiny_config(arch: str = "llama", **overrides: Any) -> transformers.PretrainedConfig:
    """A config of ``arch`` with :data:`TINY`'s values, then ``overrides``."""
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[arch](**{**TINY, **overrides})


def tiny_model(
    config: transformers.PretrainedConfig,
    *,
    seed: int = 0,
    redraw: Redraw | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """The HF causal LM of ``config`` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if redraw is not None:
        redraw.apply(model)
    return model.eval()


def tiny_state_dict(
    config: transformers.PretrainedConfig, *, seed: int = 0, redraw: Redraw | None = None
) -> dict[str, torch.Tensor]:
    """A copy of the tensors of :func:`tiny_model`, by HF name, without writing a checkpoint."""
    return _copy(tiny_model(config, seed=seed, redraw=redraw))


def save_tiny_model(
    directory: Path,
    config: transformers.PretrainedConfig | None = None,
    *,
    seed: int = 0,
    redraw: Redraw | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    max_shard_size: str | None = None,
) -> TinyCheckpoint:
    """Write :func:`tiny_model` as an HF checkpoint directory (config.json + safetensors).

    With ``tokenizer``, the tokenizer is saved beside the weights; the config must then carry its
    BOS and EOS ids, so that the engine and the tokenizer agree on them.
    """
    config = tiny_config() if config is None else config
    if tokenizer is not None:
        ids = (config.bos_token_id, config.eos_token_id)
        if ids != (tokenizer.bos_token_id, tokenizer.eos_token_id):
            raise ValueError(
                f"config BOS/EOS ids {ids} differ from the tokenizer's "
                f"{(tokenizer.bos_token_id, tokenizer.eos_token_id)}"
            )
    model = tiny_model(config, seed=seed, redraw=redraw, dtype=dtype)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if max_shard_size is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    return TinyCheckpoint(path=directory, config=config, model=model)


def smollm2_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer (chat template included), read from the installed GGUF."""
    from frontend.tokenizer import load_tokenizer
    from workers.loaders.source import resolve_model

    source = resolve_model("smollm2-135m-instruct")
    return load_tokenizer(source.path, source.format).hf
