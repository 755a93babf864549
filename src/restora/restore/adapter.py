"""`restored`: an adapter on its base at l bits, by plain PLR (or on the trained base) or by a restoration mode."""

from __future__ import annotations

import json
import sys

from restora.models.loaded import LoadedModel
from restora.restore.modes import RestorationMode, restore_with_mode
from restora.restore.plr import RestoreInfo, restore_base

__all__ = ["restored"]


def restored(
    adapter_dir: str, bits: int, format: str | None, group_size: int | None, model: str | None, base: str, force: bool,
    calib_samples: int, restore_mode: str, restore_layers: str | None, restore_modules: str | None, calib_rows: int,
    data_dir: str | None, auto_min_gain: float = 0.0, calib_task: str | None = None, seed: int = 0,
    quiet: bool = False,
) -> tuple[LoadedModel, RestoreInfo, dict | None]:
    """The adapter on its base at `bits`: plain PLR (or the trained control), or a restoration mode.

    Returns the model, what was restored, and the restoration mode's record (None for plain PLR),
    which is also printed to stderr unless `quiet`.
    """
    if restore_mode == "plain" or base == "trained":
        loaded, info = restore_base(adapter_dir, bits, format, group_size, model, base, force, calib_task=calib_task,
                                    calib_samples=calib_samples, seed=seed, data_dir=data_dir)
        return loaded, info, None
    mode = RestorationMode(restore_mode, restore_layers, restore_modules, calib_rows, auto_bits=(bits,),
                           min_gain=auto_min_gain)
    loaded, info, record = restore_with_mode(adapter_dir, bits, mode, format, model, force, data_dir, seed=seed)
    if not quiet:
        print(f"restoration: {json.dumps({k: v for k, v in record.items() if k != 'evidence'})}", file=sys.stderr)
    return loaded, info, record
