"""The `restore` command: build the inference model for an adapter at l bits (PLR), optionally merged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from restora.adapters import remove_adapters, save_adapter
from restora.models.save import save_hf
from restora.quant.checkpoint import save_quantized
from restora.restore.adapter import RestoreOptions, restored
from restora.restore.export import carried_provenance, write_hf_folder
from restora.restore.plr import merge_and_unload

if TYPE_CHECKING:
    pass

__all__ = ["restore"]


def restore(
    adapter_dir: str,
    *,
    out: str,
    bits: int = 16,
    merge: bool = False,
    model: str | None = None,
    options: RestoreOptions = RestoreOptions(),
    data_dir: str | None = None,
) -> int:
    """Rebuild ADAPTER_DIR's base at BITS (Post LoRA Restoration) and write it to OUT.

    Args:
        adapter_dir: adapter folder written by `restora train` (or PEFT, with --model).
        out: output folder.
        bits: restore bits l (16 = the float source model).
        merge: fold the adapter into the base (at 16 bits: a plain Hugging Face folder).
        model: source model, when the adapter has no provenance or it moved.
        options: how the base is rebuilt (restora.restore.adapter.RestoreOptions).
        data_dir: folder laid out like ../shared/data (for GPTQ calibration and restoration modes).
    """

    loaded, info, _ = restored(adapter_dir, bits, model, options, data_dir)
    m, tok = loaded.model, loaded.tokenizer
    dest = Path(out)
    spec = info.restore_spec
    label = spec.label() if options.base == "source" else f"trained-{info.train_spec.label()}-dequantized"  # type: ignore[union-attr]
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
