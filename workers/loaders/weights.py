"""iter_weights: the ``(hf_name, tensor)`` pairs of a local model source, whatever its format."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from workers.loaders.gguf import describe_gguf_tensor, iter_gguf_weights
from workers.loaders.safetensors_loader import iter_safetensors_weights

if TYPE_CHECKING:
    # Type-only: workers must not import core at run time (dependencies point down).
    from workers.loaders.source import ModelSource

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


def tensor_describer(source: ModelSource) -> Callable[[str], str]:
    """How errors about ``source`` name one of its tensors, given the HF name ``iter_weights``
    yields: a GGUF tensor with its llama.cpp name too, an HF one as it is stored."""
    if source.format == "gguf":
        return describe_gguf_tensor
    return repr
