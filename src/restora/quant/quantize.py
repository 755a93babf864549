"""Quantize the linear layers of a Hugging Face causal LM in place.

RTN-style formats (NF4/FP4, int8, k-bit round-to-nearest) quantize each layer independently; GPTQ needs
calibration inputs and goes block by block (restora.quant.gptq).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from restora.core.mapped import releaser
from restora.core.modules import set_module
from restora.quant.gptq import gptq_quantize_model
from restora.quant.linear import QuantLinear
from restora.quant.model import check_spec_fits, quantizable_layers
from restora.quant.spec import QuantSpec

__all__ = ["quantize_model"]


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
        if not calibration:
            raise ValueError("gptq needs calibration data: pass calibration rows (e.g. --calib-task sql)")
        return gptq_quantize_model(model, spec, calibration, progress=progress)
    drop = releaser()  # a float source memory-mapped from its file: its pages leave RSS layer by layer
    for name in tqdm(names, desc=f"quantize {spec.label()}", disable=not progress, leave=False):
        old = model.get_submodule(name)
        set_module(model, name, QuantLinear.from_linear(old, spec))
        drop(t for t in (getattr(old, "weight", None), getattr(old, "bias", None)) if isinstance(t, torch.Tensor))
    return model
