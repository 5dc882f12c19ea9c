"""Architectures by their HF ``architectures`` name, and model construction + weight loading."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ipc.config import ModelConfig
from workers.distributed import TPGroup
from workers.models.architectures import SUPPORTED_ARCHITECTURES, check_architecture
from workers.models.llama import LlamaForCausalLM, dummy_checkpoint
from workers.quantization import quantization_config

logger = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, type[torch.nn.Module]] = dict.fromkeys(SUPPORTED_ARCHITECTURES, LlamaForCausalLM)


def model_class(architecture: str) -> type[torch.nn.Module]:
    check_architecture(architecture)
    return MODEL_CLASSES[architecture]


def build_model(
    config: ModelConfig, tp: TPGroup, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    cls = model_class(config.architecture)
    quant_config = quantization_config(config.hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config.hf_config, tp, quant_config)
    finally:
        torch.set_default_dtype(previous)
    return model


def load_model_weights(model: torch.nn.Module, config: ModelConfig) -> None:
    if config.load_format == "dummy":
        device = next(model.parameters()).device
        model.load_weights(dummy_checkpoint(config.hf_config, config.seed, device))
        return
    from workers.loaders.source import ModelSource
    from workers.loaders.weights import iter_weights, tensor_describer

    source = ModelSource(path=Path(config.path), format=config.format, name=config.model)
    model.load_weights(iter_weights(source), describe=tensor_describer(source))
