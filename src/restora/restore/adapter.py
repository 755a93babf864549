"""`restored`: an adapter on its base at l bits, by plain PLR (or on the trained base) or by a restoration mode.

`RestoreOptions` are the settings of how the base is rebuilt. They are one typed dataclass shared by every
command that restores (`restore`, `eval`, `generate`, `export`) and by the Python API; restora.cli turns its
fields into the same flags for each of those commands, with the help text written once, here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Literal

from restora.models.loaded import LoadedModel
from restora.restore.modes import (
    MODES,
    RestorationMode,
    RestoreModeName,
    restore_with_mode,
)
from restora.restore.plr import RestoreInfo, restore_base

__all__ = ["RestoreOptions", "restored"]


@dataclass(frozen=True)
class RestoreOptions:
    """How an adapter's base is rebuilt at l bits.

    Args:
        format: restore format (default: the training format if it has l bits, int8 at 8, else rtn).
        group_size: restore group size (default: the training one).
        base: source (rebuild at l bits from the source model) or trained (the dequantized k-bit base: a control).
        force: accept a source model whose weight hash differs from the adapter's record.
        calib_samples: GPTQ calibration rows (train split) when the restore format is gptq.
        restore_mode: plain PLR, partial, bias-correct, partial+bias, mean-match (restored layers keep the k-bit
            mean outputs along the network), loftq (LoftQ adapters: swap the k-bit init fit for the l-bit one), or
            auto (searches on the validation split).
        restore_layers: partial: decoder blocks to restore, e.g. 0-14.
        restore_modules: partial: attn, mlp, or a regex over layer names.
        calib_rows: training rows for the bias correction's mean inputs.
        auto_min_gain: auto: restore only if that beats keeping the k-bit base by this fraction of its validation loss.
    """

    format: str | None = None
    group_size: int | None = None
    base: Literal["source", "trained"] = "source"
    force: bool = False
    calib_samples: int = 500
    restore_mode: RestoreModeName = "plain"
    restore_layers: str | None = None
    restore_modules: str | None = None
    calib_rows: int = 64
    auto_min_gain: float = 0.0

    def __post_init__(self) -> None:
        if self.restore_mode not in MODES:
            raise ValueError(f"restore mode {self.restore_mode!r} is unknown: expected one of {', '.join(MODES)}")
        if self.base not in ("source", "trained"):
            raise ValueError(f"base {self.base!r} is unknown: expected source or trained")
        if self.calib_samples <= 0 or self.calib_rows <= 0:
            raise ValueError(f"calib_samples and calib_rows must be positive, got {self.calib_samples}, "
                             f"{self.calib_rows}")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")

    def changed(self) -> list[str]:
        """The flags set away from their defaults (for commands where they do not apply)."""
        default = RestoreOptions()
        return [f"--{k.replace('_', '-')}" for k in self.__dataclass_fields__ if getattr(self, k) != getattr(default, k)]


def restored(
    adapter_dir: str,
    bits: int,
    model: str | None = None,
    options: RestoreOptions = RestoreOptions(),
    data_dir: str | None = None,
    calib_task: str | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> tuple[LoadedModel, RestoreInfo, dict | None]:
    """The adapter on its base at `bits`: plain PLR (or the trained control), or a restoration mode.

    Returns the model, what was restored, and the restoration mode's record (None for plain PLR),
    which is also printed to stderr unless `quiet`.
    """
    o = options
    if o.restore_mode == "plain" or o.base == "trained":
        loaded, info = restore_base(adapter_dir, bits, o.format, o.group_size, model, o.base, o.force,
                                    calib_task=calib_task, calib_samples=o.calib_samples, seed=seed, data_dir=data_dir)
        return loaded, info, None
    mode = RestorationMode(o.restore_mode, o.restore_layers, o.restore_modules, o.calib_rows, auto_bits=(bits,),
                           min_gain=o.auto_min_gain)
    loaded, info, record = restore_with_mode(adapter_dir, bits, mode, o.format, model, o.force, data_dir, seed=seed)
    if not quiet:
        print(f"restoration: {json.dumps({k: v for k, v in record.items() if k != 'evidence'})}", file=sys.stderr)
    return loaded, info, record
