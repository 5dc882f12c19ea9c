"""Weight loaders: turn a local model source into ``(hf_name, tensor)`` pairs.

Names are HF transformers parameter names for every format, so model code has one mapping to
maintain. Random ("dummy") weights are the model code's business, not a loader's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from workers.loaders.config import load_hf_config
from workers.loaders.gguf import iter_gguf_weights
from workers.loaders.safetensors_loader import iter_safetensors_weights

if TYPE_CHECKING:
    # Type-only: workers must not import core at run time (dependencies point down).
    from workers.loaders.source import ModelSource

__all__ = ["iter_gguf_weights", "iter_safetensors_weights", "iter_weights", "load_hf_config"]

logger = logging.getLogger(__name__)


def iter_weights(source: ModelSource, *, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every stored weight of ``source``, one at a time.

    GGUF tensors come dequantized to float32; HF checkpoints keep their stored dtype. A tied
    ``lm_head`` that is not stored is not yielded.
    """
    if source.format == "gguf":
        return iter_gguf_weights(source.path, progress=progress)
    if source.format == "hf":
        return iter_safetensors_weights(source.path, progress=progress)
    raise ValueError(f"unknown model format {source.format!r}")
