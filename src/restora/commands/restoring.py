"""The `restore` command: build the inference model for an adapter at l bits (PLR), optionally merged."""

from __future__ import annotations

import shutil
import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn

__all__ = ["restore"]


@torch.no_grad()
def _declare_biases(model: nn.Module) -> None:
    """Bias correction adds biases a bias-free architecture (Llama) does not declare: declare them
    in the config and give every other projection a zero bias, so plain transformers loads it."""
    from ..quant.model import quantizable_layers

    names = quantizable_layers(model)
    if not any(model.get_submodule(n).bias is not None for n in names):
        return
    cfg = model.config
    if not (hasattr(cfg, "attention_bias") and hasattr(cfg, "mlp_bias")):
        raise ValueError(f"{type(model).__name__}: cannot export bias-corrected layers to a plain folder; omit --merge")
    cfg.attention_bias = cfg.mlp_bias = True
    for n in names:
        lin = model.get_submodule(n)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype), requires_grad=False)


def restore(
    adapter_dir: str,
    *,
    out: str,
    bits: int = 16,
    format: str | None = None,
    group_size: int | None = None,
    merge: bool = False,
    model: str | None = None,
    base: str = "source",
    force: bool = False,
    calib_samples: int = 500,
    restore_mode: Literal["plain", "partial", "bias-correct", "partial+bias", "auto"] = "plain",
    restore_layers: str | None = None,
    restore_modules: str | None = None,
    calib_rows: int = 64,
    data_dir: str | None = None,
) -> int:
    """Rebuild ADAPTER_DIR's base at BITS (Post LoRA Restoration) and write it to OUT.

    Args:
        adapter_dir: adapter folder written by `restora train` (or PEFT, with --model).
        out: output folder.
        bits: restore bits l (16 = the float source model).
        format: restore format (default: the training format if it has l bits, int8 at 8, else rtn).
        group_size: restore group size (default: the training one).
        merge: fold the adapter into the base (at 16 bits: a plain Hugging Face folder).
        model: source model, when the adapter has no provenance or it moved.
        base: source (rebuild at l bits) or trained (the dequantized k-bit base: a control).
        force: accept a source model whose weight hash differs from the adapter's record.
        calib_samples: GPTQ calibration rows when the restore format is gptq.
        restore_mode: plain PLR, partial, bias-correct, partial+bias, or auto (validation search).
        restore_layers: partial: decoder blocks to restore, e.g. 0-14.
        restore_modules: partial: attn, mlp, or a regex over layer names.
        calib_rows: training rows for the bias correction's mean inputs.
        data_dir: folder laid out like ../shared/data (for GPTQ calibration and restoration modes).
    """
    from ..adapters import save_adapter
    from ..quant.checkpoint import save_quantized
    from ..restore import merge_and_unload, restore_base

    record = None
    if restore_mode == "plain" or base == "trained":
        loaded, info = restore_base(adapter_dir, bits, format, group_size, model, base, force,
                                    calib_samples=calib_samples, data_dir=data_dir)
    else:
        from ..restoration import RestorationMode, restore_with_mode

        mode = RestorationMode(restore_mode, restore_layers, restore_modules, calib_rows, auto_bits=(bits,))
        loaded, info, record = restore_with_mode(adapter_dir, bits, mode, format, model, force, data_dir)
        print(f"restoration: {json.dumps({k: v for k, v in record.items() if k != 'evidence'})}")
    m, tok = loaded.model, loaded.tokenizer
    dest = Path(out)
    spec = info.restore_spec
    label = spec.label() if base == "source" else f"trained-{info.train_spec.label()}-dequantized"  # type: ignore[union-attr]
    if merge:
        merge_and_unload(m)
        if spec.is_float:
            _declare_biases(m)
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            m.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.replace(dest)
            print(f"wrote {dest}: merged Hugging Face model ({label} base + adapter); loads with plain transformers")
            return 0
        save_quantized(m, tok, dest, spec, {"source": loaded.source, "source_hash": loaded.source_hash,
                                            "merged_adapter": str(adapter_dir)})
        print(f"wrote {dest}: merged {label} checkpoint (merging into a quantized base rounds)")
        return 0
    from ..adapters import remove_adapters

    prov = dict(info.provenance or {})
    keep = {k: prov[k] for k in ("base_model", "source_hash", "training", "metrics") if k in prov}
    keep["quantization"] = info.train_spec.to_dict() if info.train_spec else None
    save_adapter(m, dest / "adapter", keep)
    remove_adapters(m)
    if spec.is_float:
        m.save_pretrained(dest / "base")
        tok.save_pretrained(dest / "base")
    else:
        save_quantized(m, tok, dest / "base", spec, {"source": loaded.source, "source_hash": loaded.source_hash})
    print(f"wrote {dest}/base ({label}) and {dest}/adapter; run: restora generate {dest}/base --adapter {dest}/adapter ...")
    return 0
