"""QuantLinear: a frozen linear layer whose weight is a QuantizedWeight.

It is a drop-in for `nn.Linear` inside a Hugging Face model (same in/out features,
same call), so adapters can wrap it exactly as they wrap a float layer. A float layer
takes a merged weight in place; a QuantLinear cannot, so it offers `with_weight`: a new
layer of its own format holding the merged weight, requantized as its format decides.
Adapters merge through that method and never ask which format a base has.

Also here: the per-format dispatch (`quantize_weight`, `empty_weight`) and the functions
the rest of restora uses to look at any base layer without knowing its format:
`weight_of` (dense float weight), `linear_shape` and `quantization_of` (its settings).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from restora.quant.base import QuantizedWeight
from restora.quant.int8 import Int8Weight
from restora.quant.nf4 import NF4Weight
from restora.quant.spec import QuantSpec
from restora.quant.uniform import UniformWeight, rtn_quantize

__all__ = [
    "QuantLinear", "quantize_weight", "empty_weight", "weight_of", "linear_shape", "quantization_of", "is_linear",
]


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest style quantization of one (out, in) weight. GPTQ lives in gptq.py."""
    if spec.format in ("nf4", "fp4"):
        return NF4Weight.quantize(weight, spec.format, spec.group_size, spec.double_quant)
    if spec.format == "int8":
        return Int8Weight.quantize(weight, spec.group_size)
    if spec.format in ("rtn", "gptq"):
        # gptq without calibration data is not gptq: callers use restora.quant.gptq for that.
        return rtn_quantize(weight, spec.bits, spec.group_size)
    raise ValueError(f"format {spec.format!r} is not a quantized format")


def empty_weight(out_features: int, in_features: int, meta: dict[str, Any]) -> QuantizedWeight:
    """An empty QuantizedWeight of the format named in `meta` (for loading a checkpoint)."""
    fmt = meta.get("format")
    if fmt in ("nf4", "fp4"):
        return NF4Weight.empty(out_features, in_features, meta)
    if fmt == "int8":
        return Int8Weight.empty(out_features, in_features, meta)
    if fmt in ("rtn", "gptq"):
        return UniformWeight.empty(out_features, in_features, meta)
    raise ValueError(f"unknown quantized format {fmt!r} in checkpoint metadata")


class QuantLinear(nn.Module):
    """y = x W^T + b with W held by a QuantizedWeight (frozen) and b an optional float buffer."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = qweight
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec) -> "QuantLinear":
        # the weight as held (every format reads it in fp32 a chunk at a time), not an fp32 copy of all of it
        w = linear.weight.detach() if isinstance(linear, nn.Linear) else weight_of(linear)
        bias = getattr(linear, "bias", None)
        return cls(quantize_weight(w, spec), bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def requantize_spec(self) -> QuantSpec:
        """The spec a new weight for this layer is quantized with (its format decides; see QuantizedWeight)."""
        return self.qweight.requantize_spec()

    def with_weight(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, stacklevel: int = 1
    ) -> "QuantLinear":
        """A new layer of this format holding the dense (out, in) `weight` (and `bias`, else this one's).

        This is how an adapter is merged into a quantized base: the codes cannot change in place,
        and requantizing rounds, so it warns. The warning names the line `stacklevel` frames up
        (1: the caller's), as warnings.warn does. This layer is left as it was, so whoever keeps
        it can undo the merge exactly.
        """
        spec = self.requantize_spec()
        warnings.warn(
            f"merging into a {spec.label()} base requantizes the weight, which rounds: merged outputs differ"
            " slightly from unmerged ones",
            stacklevel=stacklevel + 1,
        )
        with torch.no_grad():
            return QuantLinear(quantize_weight(weight.float(), spec), self.bias if bias is None else bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def is_linear(module: nn.Module) -> bool:
    """A float nn.Linear, a GPT-2 Conv1D, or a QuantLinear."""
    return isinstance(module, (nn.Linear, QuantLinear)) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of any supported base layer."""
    if isinstance(module, (nn.Linear, QuantLinear)):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return int(module.nf), int(module.weight.shape[0])
    raise TypeError(f"{type(module).__name__} is not a linear layer restora can wrap")


def quantization_of(module: nn.Module) -> dict[str, Any]:
    """The settings of any supported base layer's weight: its format's `meta()`, or float at 16 bits."""
    if isinstance(module, QuantLinear):
        return dict(module.qweight.meta())
    return {"format": "float", "bits": 16}


def weight_of(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (out, in) weight of any supported base layer, as a new float tensor."""
    if isinstance(module, QuantLinear):
        return module.dequantize(dtype)
    if isinstance(module, nn.Linear):
        return module.weight.detach().to(dtype).clone()
    if type(module).__name__ == "Conv1D":
        return module.weight.detach().T.to(dtype).clone()
    raise TypeError(f"{type(module).__name__} is not a linear layer restora can wrap")
