"""Read a model's HF config from a local GGUF file or HF directory, never from a hub."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    # Type-only: workers must not import core at run time (dependencies point down).
    from workers.loaders.source import ModelSource

logger = logging.getLogger(__name__)


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    """The transformers config of ``source``.

    For a GGUF file this is what transformers derives from the file's metadata (architecture,
    sizes, rope, bos/eos ids, tie_word_embeddings from whether an ``output`` tensor exists), so
    the model we build matches the one transformers would build from the same file.
    """
    # Imported here: transformers is slow to import and only this call needs it.
    from transformers import AutoConfig

    # local_files_only makes transformers resolve everything from the directory and fail instead
    # of falling back to the hub, the same as HF_HUB_OFFLINE=1 but without touching the
    # process environment.
    if source.format == "gguf":
        config = AutoConfig.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, local_files_only=True
        )
    elif source.format == "hf":
        config = AutoConfig.from_pretrained(str(source.path), local_files_only=True)
    else:
        raise ValueError(f"unknown model format {source.format!r}")
    logger.debug("loaded %s config for %s", type(config).__name__, source.path)
    return config


# Keys the engine reads from a Llama config without a default of its own (LlamaArgs.from_hf and
# EngineArgs); a config.json that has them all is complete enough to be read without transformers.
_LLAMA_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


def read_hf_config(source: ModelSource) -> dict[str, Any]:
    """The model's HF config as a plain dict, as ``load_hf_config(source).to_dict()`` has it.

    A Llama ``config.json`` that names every size is read as JSON: importing transformers to parse
    it costs the server's start seconds on a fresh machine (cold disk), and LlamaConfig's defaults for
    the keys it may omit are the ones the engine assumes anyway (rms_norm_eps 1e-6, rope_theta 1e4,
    untied embeddings, no biases, silu). Anything else (GGUF, other model types, partial files)
    goes through transformers.
    """
    if source.format == "hf":
        path = source.path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            raw = None
        if (
            isinstance(raw, dict)
            and raw.get("model_type") == "llama"
            and all(k in raw for k in _LLAMA_REQUIRED)
        ):
            logger.debug("read %s as JSON", path)
            return raw
    return load_hf_config(source).to_dict()
