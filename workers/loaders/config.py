"""Read a model's HF config from a local GGUF file or HF directory, never from a hub."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

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
