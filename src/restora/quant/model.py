"""Quantize the linear layers of a Hugging Face causal LM in place.

Which layers: every linear layer inside the decoder blocks (attention and MLP
projections). Embeddings and the LM head stay in float, as in QLoRA and GPTQ.
RTN-style formats quantize each layer independently; GPTQ needs calibration inputs and
goes block by block (see gptq.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..mapped import converter, releaser
from .base import QuantizedWeight
from .linear import QuantLinear, is_linear, linear_shape
from .spec import QuantSpec

__all__ = ["quantizable_layers", "set_module", "quantize_model", "check_spec_fits", "decoder_blocks", "cast_unquantized"]

_SKIP = re.compile(r"(^|\.)(lm_head|embed_tokens|wte|wpe|embed_out|score)$")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama/Qwen2/Mistral/Gemma/GPT-2 layouts)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "layers"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the linear layers inside decoder blocks, in model order."""
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and is_linear(module) and not _SKIP.search(name)
    ]


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def check_spec_fits(model: nn.Module, spec: QuantSpec, names: Iterable[str] | None = None) -> None:
    """Raise a one-line error before any work if some layer cannot take this spec."""
    for name in names if names is not None else quantizable_layers(model):
        _, in_f = linear_shape(model.get_submodule(name))
        spec.check_layer(name, in_f)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    calibration: list[torch.Tensor] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Replace the model's decoder linear layers by QuantLinear layers of `spec`, in place.

    `calibration` (a list of 1-D token-id tensors) is required for gptq and ignored otherwise.
    Returns the model for chaining. A float spec leaves the model unchanged.
    """
    if spec.is_float:
        return model
    names = quantizable_layers(model)
    check_spec_fits(model, spec, names)
    if spec.format == "gptq":
        from .gptq import gptq_quantize_model

        if not calibration:
            raise ValueError("gptq needs calibration data: pass calibration rows (e.g. --calib-task sql)")
        return gptq_quantize_model(model, spec, calibration, progress=progress)
    drop = releaser()  # a float source memory-mapped from its file: its pages leave RSS layer by layer
    for name in tqdm(names, desc=f"quantize {spec.label()}", disable=not progress, leave=False):
        old = model.get_submodule(name)
        set_module(model, name, QuantLinear.from_linear(old, spec))
        drop(t for t in (getattr(old, "weight", None), getattr(old, "bias", None)) if isinstance(t, torch.Tensor))
    return model


@torch.no_grad()
def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every floating parameter and buffer outside the quantized weights to `dtype`, in place: a quantized base
    whose other parts (embeddings, tied head, norms, biases) are held as a float base's are. Quantized weights
    keep their formats (fp16 scales, fp32 absmax and code tables included). Parameters keep their identity, so
    tied weights stay tied; each fp32 source's mapped pages are dropped as it converts (restora.mapped)."""
    convert = converter(dtype)
    quantized = {id(m) for q in model.modules() if isinstance(q, QuantizedWeight) for m in q.modules()}
    for module in model.modules():
        if id(module) not in quantized:
            module._apply(convert, recurse=False)  # as model.to does, one module at a time
    return model
