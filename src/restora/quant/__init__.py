"""Quantization formats: NF4/FP4 (+double quant), int8, uniform k-bit (RTN and GPTQ)."""

from .base import QuantizedWeight
from .int8 import Int8Weight
from .linear import QuantLinear, empty_weight, linear_shape, quantize_weight, weight_of
from .model import quantizable_layers, quantize_model
from .nf4 import NF4Weight
from .spec import FORMATS, SUPPORTED_BITS, QuantSpec
from .uniform import UniformWeight, rtn_quantize

__all__ = [
    "QuantizedWeight", "Int8Weight", "NF4Weight", "UniformWeight", "QuantLinear", "QuantSpec",
    "FORMATS", "SUPPORTED_BITS", "quantize_weight", "empty_weight", "weight_of", "linear_shape",
    "quantizable_layers", "quantize_model", "rtn_quantize",
]
