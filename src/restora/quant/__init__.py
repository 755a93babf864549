"""Quantization formats: NF4/FP4 (+double quant), int8, uniform k-bit (RTN and GPTQ)."""

from restora.quant.base import QuantizedWeight
from restora.quant.int8 import Int8Weight
from restora.quant.linear import QuantLinear, empty_weight, linear_shape, quantize_weight, weight_of
from restora.quant.model import quantizable_layers
from restora.quant.quantize import quantize_model
from restora.quant.nf4 import NF4Weight
from restora.quant.spec import FORMATS, SUPPORTED_BITS, QuantSpec
from restora.quant.uniform import UniformWeight, rtn_quantize

__all__ = [
    "QuantizedWeight", "Int8Weight", "NF4Weight", "UniformWeight", "QuantLinear", "QuantSpec",
    "FORMATS", "SUPPORTED_BITS", "quantize_weight", "empty_weight", "weight_of", "linear_shape",
    "quantizable_layers", "quantize_model", "rtn_quantize",
]
