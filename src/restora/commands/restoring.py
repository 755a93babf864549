"""The `restore` command: build the inference model for an adapter at l bits (PLR), optionally merged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from restora.adapters import remove_adapters, save_adapter
from restora.models.save import save_hf
from restora.quant.checkpoint import save_quantized
from restora.restore.adapter import restored
from restora.restore.export import carried_provenance, write_hf_folder
from restora.restore.modes import RestoreModeName
from restora.restore.plr import merge_and_unload

if TYPE_CHECKING:
    pass

__all__ = ["restore"]


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
    restore_mode: RestoreModeName = "plain",
    restore_layers: str | None = None,
    restore_modules: str | None = None,
    calib_rows: int = 64,
    auto_min_gain: float = 0.0,
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
        restore_mode: plain PLR, partial, bias-correct, partial+bias, mean-match (restored layers keep the k-bit mean outputs along the network), loftq (LoftQ adapters: swap the k-bit init fit for the l-bit one), or auto (validation search).
        restore_layers: partial: decoder blocks to restore, e.g. 0-14.
        restore_modules: partial: attn, mlp, or a regex over layer names.
        calib_rows: training rows for the bias correction's mean inputs.
        auto_min_gain: auto: restore only if that beats keeping the k-bit base by this fraction of its validation loss.
        data_dir: folder laid out like ../shared/data (for GPTQ calibration and restoration modes).
    """

    loaded, info, _ = restored(adapter_dir, bits, format, group_size, model, base, force, calib_samples, restore_mode,
                            restore_layers, restore_modules, calib_rows, data_dir, auto_min_gain)
    m, tok = loaded.model, loaded.tokenizer
    dest = Path(out)
    spec = info.restore_spec
    label = spec.label() if base == "source" else f"trained-{info.train_spec.label()}-dequantized"  # type: ignore[union-attr]
    if merge:
        merge_and_unload(m)
        if spec.is_float:
            write_hf_folder(m, tok, dest)
            print(f"wrote {dest}: merged Hugging Face model ({label} base + adapter); loads with plain transformers")
            return 0
        save_quantized(m, tok, dest, spec, {"source": loaded.source, "source_hash": loaded.source_hash,
                                            "merged_adapter": str(adapter_dir)})
        print(f"wrote {dest}: merged {label} checkpoint (merging into a quantized base rounds)")
        return 0

    save_adapter(m, dest / "adapter", carried_provenance(info, loaded))
    remove_adapters(m)
    if spec.is_float:
        save_hf(m, dest / "base", tok)
    else:
        save_quantized(m, tok, dest / "base", spec, {"source": loaded.source, "source_hash": loaded.source_hash})
    print(f"wrote {dest}/base ({label}) and {dest}/adapter; run: restora generate {dest}/base --adapter {dest}/adapter ...")
    return 0
