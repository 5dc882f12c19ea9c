"""Linear methods: how each linear layer stores its weight and computes its GEMM, one class per
weight format (base.py for the interface, config.py for the choice by name)."""

from workers.quantization.base import LinearLayer, LinearMethod, LinearPartition
from workers.quantization.config import (
    LINEAR_METHODS,
    UNQUANTIZED,
    QuantizationConfig,
    quantization_config,
)
from workers.quantization.unquantized import UnquantizedLinearMethod, attach_gemm_plan, gemm_weights

__all__ = [
    "LINEAR_METHODS",
    "UNQUANTIZED",
    "LinearLayer",
    "LinearMethod",
    "LinearPartition",
    "QuantizationConfig",
    "UnquantizedLinearMethod",
    "attach_gemm_plan",
    "gemm_weights",
    "quantization_config",
]
