"""Which layers of a Hugging Face causal LM restora quantizes, and casting the parts it leaves in float.

Which layers: every linear layer inside the decoder blocks (attention and MLP
projections). Embeddings and the LM head stay in float, as in QLoRA and GPTQ.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from restora.core.mapped import converter
from restora.core.modules import decoder_blocks
from restora.quant.base import QuantizedWeight
from restora.quant.linear import is_linear, linear_shape
from restora.quant.spec import QuantSpec

__all__ = ["quantizable_layers", "check_spec_fits", "cast_unquantized"]

_SKIP = re.compile(r"(^|\.)(lm_head|embed_tokens|wte|wpe|embed_out|score)$")


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the linear layers inside decoder blocks, in model order."""
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and is_linear(module) and not _SKIP.search(name)
    ]


def check_spec_fits(model: nn.Module, spec: QuantSpec, names: Iterable[str] | None = None) -> None:
    """Raise a one-line error before any work if some layer cannot take this spec."""
    for name in names if names is not None else quantizable_layers(model):
        _, in_f = linear_shape(model.get_submodule(name))
        spec.check_layer(name, in_f)


@torch.no_grad()
def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every floating parameter and buffer outside the quantized weights to `dtype`, in place: a quantized base
    whose other parts (embeddings, tied head, norms, biases) are held as a float base's are. Quantized weights
    keep their formats (fp16 scales, fp32 absmax and code tables included). Parameters keep their identity, so
    tied weights stay tied; each fp32 source's mapped pages are dropped as it converts (restora.core.mapped)."""
    convert = converter(dtype)
    quantized = {id(m) for q in model.modules() if isinstance(q, QuantizedWeight) for m in q.modules()}
    for module in model.modules():
        if id(module) not in quantized:
            module._apply(convert, recurse=False)  # as model.to does, one module at a time
    return model
