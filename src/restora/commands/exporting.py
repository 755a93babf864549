"""The `export` command: an adapter as a folder vLLM and SGLang serve (restora.restore.export)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import torch

from restora.adapters import read_adapter_config
from restora.restore.adapter import RestoreOptions, restored
from restora.restore.export import (
    VLLM_MAX_LORA_RANKS,
    default_merge,
    export_merged_hf,
    export_peft,
)

__all__ = ["TARGETS", "export"]

TARGETS = ("peft", "merged-hf")


def _serve_hint(out: Path) -> str:
    cfg = json.loads((out / "adapter_config.json").read_text())
    rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= int(cfg["r"]))
    flag = f" --max-lora-rank {rank}" if rank > 16 else ""  # vLLM's default is 16
    return f"vllm serve {cfg['base_model_name_or_path']} --enable-lora{flag} --lora-modules {out.name}={out}"


def export(
    adapter: str,
    out: str,
    *,
    to: str,
    bits: int | None = None,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    model: str | None = None,
    overwrite: bool = False,
    options: RestoreOptions = RestoreOptions(),
    data_dir: str | None = None,
) -> int:
    """Write ADAPTER as a folder vLLM and SGLang serve: a PEFT LoRA folder, or the model merged at L bits.

    Args:
        adapter: adapter folder written by `restora train` (or PEFT, with --model).
        out: output folder (refused if it exists, unless --overwrite).
        to: peft (adapter_config.json + adapter_model.safetensors on the 16-bit source model; LoRA only) or merged-hf (the adapter folded into the base restored at --bits, a plain transformers folder).
        bits: merged-hf: restore bits l of the base (16 = the float source model). Without it and without
            --restore-mode/--base, a QLoRA adapter is merged as the PLR study supports (docs/plr-study.md), and the
            choice is printed with its reason.
        dtype: merged-hf: dtype of the merged weights (float32 keeps the merged sums exactly).
        model: source model, when the adapter has no provenance or it moved.
        overwrite: replace OUT if it exists.
        options: merged-hf: how the base is rebuilt (restora.restore.adapter.RestoreOptions; --force applies to
            both targets).
        data_dir: folder laid out like ../shared/data (for GPTQ calibration and restoration modes).
    """
    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is unknown: expected peft or merged-hf")
    src, dest = Path(adapter), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such adapter folder")
    read_adapter_config(src)  # a PEFT folder, before any model is loaded
    if dest.exists() and not overwrite:
        raise ValueError(f"{dest} exists: pass --overwrite to replace it")
    if dest.resolve() == src.resolve():
        raise ValueError(f"{dest} is the adapter folder itself: choose another OUT")
    if to == "peft":
        changed = (["--bits"] if bits is not None else []) + [f for f in options.changed() if f != "--force"]
        if changed:
            raise ValueError(f"{' '.join(changed)} only apply to --to merged-hf: a PEFT folder goes on the 16-bit source model")
        export_peft(src, dest, model, options.force)
        print(f"wrote {dest}: PEFT LoRA folder on the 16-bit source (PLR16); serve: {_serve_hint(dest)}")
        return 0
    bits, options, why = default_merge(src, bits, options)
    print(f"restoration: {options.restore_mode if options.base == 'source' else 'the trained base'} at {bits} bits"
          f" ({why})", file=sys.stderr)
    loaded, info, chosen = restored(adapter, bits, model, options, data_dir)
    record = {"source": loaded.source, "source_hash": loaded.source_hash, "adapter": str(src.resolve()),
              "restore": info.restore_spec.to_dict(), "restore_mode": options.restore_mode, "dtype": dtype,
              "trained_on": info.train_spec.to_dict() if info.train_spec else None, "why": why,
              "restoration": {k: v for k, v in (chosen or {}).items() if k != "evidence"}}
    export_merged_hf(loaded, dest, getattr(torch, dtype), record)
    base = "16-bit source" if info.restore_spec.is_float else info.restore_spec.label()
    print(f"wrote {dest}: adapter merged into the {base} base, {dtype}; "
          f"loads with plain transformers (vllm serve {dest})")
    return 0
