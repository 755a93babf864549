"""Post LoRA Restoration (PLR; the Post LoRA Restoration report, Doshisha Univ., 2024): put a k-bit-trained adapter on an l-bit base.

Training used W = W0^(k) + ΔW_LoRA; inference uses W = W0^(l) + ΔW_LoRA with l chosen
to fit the inference memory (up to 16 = the float source). No training is involved:
the base is rebuilt from the source model at l bits and the adapter is attached to it
unchanged (`LoRALinear.swap_base` is the same operation, layer by layer).

    restore_base(adapter, restore_bits=l)   the model for inference, in memory
    merge_and_unload(model)                 fold adapters into the base layers

The source model comes from the adapter's provenance (restora.json) or `model=`; a
source whose weight hash differs from the recorded one is refused unless forced. The
control `base="trained"` rebuilds the k-bit base the adapter was trained on and
dequantizes it to float, to separate "more precision" from "different weights".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restora.adapters import adapter_modules, load_adapter
from restora.adapters.files import read_provenance
from restora.core.modules import set_module
from restora.models.bases import BaseChoice, build_base, build_loftq_base
from restora.models.loaded import LoadedModel
from restora.quant.linear import QuantLinear
from restora.quant.spec import SUPPORTED_BITS, QuantSpec

__all__ = [
    "RestoreInfo", "read_provenance", "restore_spec", "restore_base", "merge_and_unload", "dequantize_model",
    "build_trained_base", "train_spec",
]


@dataclass
class RestoreInfo:
    train_spec: QuantSpec | None
    restore_spec: QuantSpec
    base: str  # "source" or "trained"
    provenance: dict[str, Any] | None


def train_spec(prov: dict[str, Any] | None) -> QuantSpec | None:
    q = (prov or {}).get("quantization")
    if not q:
        return None
    known = {k: v for k, v in q.items() if k in QuantSpec.__dataclass_fields__}
    return QuantSpec(**known)


def restore_spec(train: QuantSpec | None, bits: int, format: str | None = None, group_size: int | None = None) -> QuantSpec:
    """The l-bit spec: 16 = float; else `format`, else the training format if it has l bits, else rtn."""
    if bits == 16:
        return QuantSpec("float", 16)
    g = group_size if group_size is not None else (train.group_size if train and train.group_size > 0 else 64)
    if format is None:
        if train is not None and not train.is_float and bits in SUPPORTED_BITS[train.format]:
            format = train.format
        elif bits == 8:
            format = "int8"
        else:
            format = "rtn"
    return QuantSpec(format=format, bits=bits, group_size=g)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight in `dtype`.

    In fp32 this is the `--base trained` control. In bf16 it is how evaluation runs fast:
    under bf16 compute the tiled path multiplies by exactly these bf16 weights anyway, so
    materializing them once per evaluation changes speed and memory, not the numbers
    (except where the int4 decode kernel would round differently).
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
            lin.weight.copy_(m.dequantize(dtype))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            lin.requires_grad_(False)
            set_module(model, name, lin)
    return model


def _calibration(prov: dict[str, Any] | None, task: str | None, samples: int, seed: int) -> BaseChoice:
    """GPTQ calibration of the training run when recorded (so k bits rebuild the trained base)."""
    cal = ((prov or {}).get("training") or {}).get("calibration") or {}
    return BaseChoice(
        QuantSpec("float", 16),
        calib_task=cal.get("task", task or "sql"),
        calib_samples=int(cal.get("samples", samples)),
        calib_max_len=int(cal.get("max_len", 256)),
        seed=int(cal.get("seed", seed)),
    )


def build_trained_base(prov: dict[str, Any], source: str, data_dir: str | None = None, samples: int = 500) -> LoadedModel:
    """Exactly the k-bit base an adapter was trained on: same format, bits, calibration, LoftQ init."""
    train = train_spec(prov)
    if train is None:
        raise ValueError("restora.json records no training quantization: cannot rebuild the trained base")
    training = prov.get("training") or {}
    if training.get("init") == "loftq":
        a = prov.get("adapter") or {}
        return build_loftq_base(source, train, int(a["r"]), float(a["alpha"]), bool(a.get("use_rslora")),
                                list(a["targets"]), int(training.get("loftq_iters") or 5))
    cal = _calibration(prov, training.get("task"), samples, int(training.get("seed", 0)))
    return build_base(source, BaseChoice(train, cal.calib_task, cal.calib_samples, cal.calib_max_len, cal.seed), data_dir)


def restore_base(
    adapter_dir: str | Path,
    restore_bits: int,
    format: str | None = None,
    group_size: int | None = None,
    model: str | None = None,
    base: str = "source",
    force: bool = False,
    calib_task: str | None = None,
    calib_samples: int = 500,
    seed: int = 0,
    data_dir: str | None = None,
) -> tuple[LoadedModel, RestoreInfo]:
    """The adapter in `adapter_dir` on its source model rebuilt at `restore_bits` (PLR)."""
    if base not in ("source", "trained"):
        raise ValueError(f"base must be 'source' or 'trained', got {base!r}")
    prov = read_provenance(adapter_dir)
    source = model or (prov or {}).get("base_model")
    if not source:
        raise ValueError(f"{adapter_dir}: no restora.json provenance names the base model: pass --model MODEL")
    train = train_spec(prov)
    training = (prov or {}).get("training") or {}
    calib = calib_task or training.get("task") or "sql"
    if base == "trained":
        if train is None:
            raise ValueError(f"{adapter_dir}: --base trained needs the training quantization in restora.json")
        spec = train
    else:
        spec = restore_spec(train, restore_bits, format, group_size)
        k = train.bits if train is not None else None
        if k is not None and spec.bits < k:
            warnings.warn(f"restore bits {spec.bits} < train bits {k}: this is not PLR (the base loses precision)", stacklevel=2)
    if base == "trained" or (train is not None and spec == train):
        loaded = build_trained_base(prov or {}, source, data_dir, calib_samples)
    else:
        cal = _calibration(prov, calib, calib_samples, seed)
        loaded = build_base(source, BaseChoice(spec, cal.calib_task, cal.calib_samples, cal.calib_max_len, cal.seed), data_dir)
    if base == "trained":
        dequantize_model(loaded.model)
    load_adapter(loaded.model, adapter_dir, expected_source_hash=loaded.source_hash, force=force)
    loaded.model.eval()  # new adapter modules start in training mode (dropout on)
    return loaded, RestoreInfo(train, spec if base == "source" else QuantSpec("float", 16), base, prov)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer and put the base layer back in the model."""
    for path, module in list(adapter_modules(model)):
        module.merge()
        set_module(model, path, module.base_layer)
    return model
