"""Which linear method a model's layers run: the model's quantization config and the methods by name.

A format joins by adding its ``LinearMethod`` class to ``LINEAR_METHODS`` under the name that
checkpoints give it in ``config.json``'s ``quantization_config.quant_method`` (vLLM's names).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from workers.quantization.base import LinearMethod
from workers.quantization.unquantized import UnquantizedLinearMethod

LINEAR_METHODS: Mapping[str, type[LinearMethod]] = MappingProxyType(
    {method.name: method for method in (UnquantizedLinearMethod,)}
)


@dataclass(frozen=True, slots=True)
class QuantizationConfig:
    """The model's weight format: the method class every linear layer gets an instance of, and
    the checkpoint's ``quantization_config`` settings that instance is made from."""

    method: type[LinearMethod] = UnquantizedLinearMethod
    # Compared, not hashed (a mapping has no hash): equal configs still hash alike.
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def name(self) -> str:
        return self.method.name

    def linear_method(self) -> LinearMethod:
        """A new method for one layer."""
        return self.method.from_config(self.settings)


UNQUANTIZED = QuantizationConfig()


def quantization_config(hf_config: Mapping[str, Any]) -> QuantizationConfig:
    """The quantization config of a model from its HF config: unquantized without a
    ``quantization_config``; otherwise the method its ``quant_method`` names (ValueError when the
    name is missing or not one of ``LINEAR_METHODS``)."""
    settings = hf_config.get("quantization_config")
    if settings is None:
        return UNQUANTIZED
    if not isinstance(settings, Mapping) or not isinstance(settings.get("quant_method"), str):
        raise ValueError(f"config.json's quantization_config names no quant_method: {settings!r}")
    name = settings["quant_method"]
    method = LINEAR_METHODS.get(name)
    if method is None:
        supported = ", ".join(sorted(LINEAR_METHODS))
        raise ValueError(f"quantization method {name!r} is not supported; supported: {supported}")
    return QuantizationConfig(method, MappingProxyType(dict(settings)))
