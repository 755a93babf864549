"""The `loftq` restoration mode: restore a LoftQ-initialised adapter to l bits.

LoftQ (Li et al. 2023) trains from W_k + s·B₀A₀, where (W_k, B₀A₀) is the
joint fit of W at k bits: s·B₀A₀ ≈ the rank-r part of W − W_k. Training moves the adapter
to s·BA = s·B₀A₀ + (what the task taught). Plain PLR keeps s·BA on W_l, so the k-bit
residual fit B₀A₀ stays in the model although W_l no longer has W_k's error. This mode
swaps that fit for the one that belongs to the new base:

    W_l + s·(BA − B₀A₀ + B_l A_l)        (W_l, B_l A_l) = LoftQ of W at l bits (same r, s,
                                          iterations; deterministic), and B_l A_l = 0 at 16 bits

The three terms are kept exactly as one LoRA of rank 3r (2r at 16 bits):

    A' = [A; A₀; A_l]   (3r, in)        B' = [B, −B₀, B_l]   (out, 3r)

so the l-bit base stays quantized and nothing is approximated. With no training steps
(A, B = A₀, B₀) the result is the LoftQ target at l bits; with l = k it is the trained model.
LoftQ's initial factors are read from `loftq_init.safetensors`, which `restora train --init
loftq` writes beside the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from restora.adapters import load_adapter
from restora.adapters.lora import LoRALinear, adapter_modules
from restora.models.bases import build_loftq_base
from restora.models.loaded import LoadedModel
from restora.restore.plr import (
    RestoreInfo,
    read_provenance,
    restore_base,
    restore_spec,
    train_spec,
)

__all__ = ["INIT_FILE", "restore_loftq"]

INIT_FILE = "loftq_init.safetensors"


def _init_factors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = adapter_dir / INIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: restore mode loftq needs the LoftQ init that"
                                " `restora train --init loftq` saves beside the adapter")
    return load_file(str(path))


def restore_loftq(
    adapter_dir: str | Path,
    bits: int,
    format: str | None = None,
    group_size: int | None = None,
    model: str | None = None,
    force: bool = False,
    data_dir: str | None = None,
) -> tuple[LoadedModel, RestoreInfo, dict[str, Any]]:
    """The LoftQ adapter on the LoftQ base at `bits`, with B₀A₀ replaced by the l-bit fit."""
    adapter_dir = Path(adapter_dir)
    prov = read_provenance(adapter_dir) or {}
    training = prov.get("training") or {}
    if training.get("init") != "loftq":
        raise ValueError(f"{adapter_dir}: restore mode loftq needs an adapter trained with --init loftq,"
                         f" this one was trained with init {training.get('init', 'default')!r}")
    init = _init_factors(adapter_dir)
    train = train_spec(prov)
    spec = restore_spec(train, bits, format, group_size)
    record: dict[str, Any] = {"mode": "loftq", "restore_bits": spec.bits}
    if train is not None and spec == train:  # l = k: the trained model itself
        loaded, info = restore_base(adapter_dir, bits, format, group_size, model, force=force, data_dir=data_dir)
        return loaded, info, record
    source = model or prov.get("base_model")
    if not source:
        raise ValueError(f"{adapter_dir}: no restora.json provenance names the base model: pass --model MODEL")
    a = prov.get("adapter") or {}
    fits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if spec.is_float:  # the float source, as plain PLR16 builds it; the l-bit residual fit is 0
        loaded, _ = restore_base(adapter_dir, bits, format, group_size, model, force=force, data_dir=data_dir)
    else:
        loaded = build_loftq_base(source, spec, int(a["r"]), float(a["alpha"]), bool(a.get("use_rslora")),
                                  list(a["targets"]), int(training.get("loftq_iters") or 5))
        fits = {n: (res.lora_A, res.lora_B) for n, res in loaded.loftq.items()}  # type: ignore[attr-defined]
        load_adapter(loaded.model, adapter_dir, expected_source_hash=loaded.source_hash, force=force)
        loaded.model.eval()
    swapped = 0
    for name, module in adapter_modules(loaded.model):
        if not isinstance(module, LoRALinear):
            raise ValueError(f"{adapter_dir}: restore mode loftq applies to LoRA adapters, {name} is {type(module).__name__}")
        key = f"base_model.model.{name}.lora_"
        if key + "A.weight" not in init:
            raise ValueError(f"{adapter_dir / INIT_FILE}: no LoftQ init for layer {name}")
        a0, b0 = init[key + "A.weight"].float(), init[key + "B.weight"].float()
        a_t, b_t = module.lora_A.weight.detach().float(), module.lora_B.weight.detach().float()
        a_parts, b_parts = [a_t, a0], [b_t, -b0]  # (r, in) / (out, r) each
        if name in fits:
            a_l, b_l = fits[name]
            a_parts.append(a_l.float())
            b_parts.append(b_l.float())
        dtype = module.lora_A.weight.dtype
        module.set_factors(torch.cat(a_parts, 0).to(dtype), torch.cat(b_parts, 1).to(dtype))  # (3r, in), (out, 3r)
        swapped += 1
    record.update({"swapped_layers": swapped, "rank": int(a["r"]) * (2 if spec.is_float else 3)})
    return loaded, RestoreInfo(train, spec, "source", prov), record
