"""Named adapters resident at once over one base, one slot each: what a server loads, unloads and evicts.

`MultiAdapterModel` wraps each targeted layer of the model in a MultiLoRALinear (restora.adapters.batched) the
first time an adapter needs it, loads restora or PEFT folders by name into free slots (everything checked
before the model changes), empties a slot on removal (other slots keep their ids) and unwraps layers no
adapter uses any more. `adapter_index(name)` gives the slot a batch row uses; `BASE` (0) means the base alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from restora.quant.linear import linear_shape
from restora.core.modules import set_module

from restora.adapters.batched import BASE, MultiLoRALinear, set_rows
from restora.adapters.files import CONFIG_NAME, WEIGHTS_NAME, AdapterInfo, read_adapter_config, read_provenance
from restora.adapters.ia3 import IA3Config
from restora.adapters.inject import PEFT_PREFIX, checked_peft_state, feedforward_paths, select_targets
from restora.adapters.lora import LoRAConfig, adapter_modules

__all__ = ["MultiAdapterModel", "load_adapters"]


class MultiAdapterModel:
    """Named adapters resident at once over one base `model` (wrapped in place), one slot each."""

    def __init__(self, model: nn.Module) -> None:
        found = list(adapter_modules(model))
        if found:
            what = "multi-adapter layers" if isinstance(found[0][1], MultiLoRALinear) else "a single adapter"
            raise ValueError(f"{type(model).__name__} already has {what} at {found[0][0]}: remove_adapters() first")
        self.model = model
        self.slots: dict[str, int] = {}
        self.infos: dict[str, AdapterInfo] = {}

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    @property
    def num_slots(self) -> int:
        return 1 + max(self.slots.values(), default=0)

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, name: object) -> bool:
        return name in self.slots

    def layers(self) -> dict[str, MultiLoRALinear]:
        return {p: m for p, m in self.model.named_modules() if isinstance(m, MultiLoRALinear)}

    def adapter_index(self, name: str | None) -> int:
        """The slot rows use for adapter `name` (None: BASE)."""
        if name is None:
            return BASE
        if name not in self.slots:
            raise KeyError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.slots) or 'none'})")
        return self.slots[name]

    def rows(self, names: Sequence[str | None]) -> torch.Tensor:
        """(B,) slot ids for a batch whose row b uses adapter names[b] (None: the base)."""
        return torch.tensor([self.adapter_index(n) for n in names], dtype=torch.long)

    def set_rows(self, ids: torch.Tensor | Sequence[int]) -> None:
        """As set_rows(model, ids), also refusing slots no loaded adapter holds."""
        free = sorted(set(torch.as_tensor(ids).tolist()) - {BASE, *self.slots.values()})
        if free:
            raise ValueError(f"row ids name empty slots {free}: loaded are {self.slots}")
        set_rows(self.model, ids)

    def add_adapter(
        self, name: str, folder: str | os.PathLike, expected_source_hash: str | None = None, force: bool = False
    ) -> int:
        """Load the restora or PEFT adapter in `folder` as `name` into a free slot; returns the slot.

        Everything is checked before the model changes (config, source hash, keys, shapes, finite values).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.slots:
            raise ValueError(f"an adapter named {name!r} is already loaded (from {self.infos[name].folder})")
        folder = Path(folder)
        kind, config = read_adapter_config(folder)
        provenance = read_provenance(folder, expected_source_hash, force)
        weights_path = folder / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: no such file")
        try:
            paths = select_targets(self.model, config.target_modules)
        except ValueError as e:
            raise ValueError(f"{folder / CONFIG_NAME}: {e}") from None
        tensors = self._check_tensors(kind, config, paths, load_file(str(weights_path)), str(weights_path))

        slot = min(set(range(1, self.num_slots + 1)) - set(self.slots.values()))
        rows = next((m.rows for m in self.layers().values()), None)
        for path in paths:
            layer = self.model.get_submodule(path)
            if not isinstance(layer, MultiLoRALinear):
                layer = MultiLoRALinear(layer, self.num_slots)
                layer.rows = rows
                set_module(self.model, path, layer)
        self.slots[name] = slot
        for layer in self.layers().values():
            layer.grow(self.num_slots)
        for path, (A, B, vec, ff) in tensors.items():
            layer = self.model.get_submodule(path)
            if vec is None:
                layer.set_lora(slot, A, B, config.scaling)  # type: ignore[union-attr]
            else:
                layer.set_ia3(slot, vec, ff)
        self.infos[name] = AdapterInfo(kind=kind, paths=paths, config=config, provenance=provenance, folder=folder)
        return slot

    def _check_tensors(
        self, kind: str, config: LoRAConfig | IA3Config, paths: list[str], state: dict[str, torch.Tensor], source: str
    ) -> dict[str, tuple[Any, Any, Any, bool]]:
        """path -> (A, B, None, False) for LoRA or (None, None, vector, feedforward) for (IA)³; one-line errors."""
        ff = feedforward_paths(paths, config.feedforward_modules) if isinstance(config, IA3Config) else set()
        expected: dict[str, tuple[int, ...]] = {}
        for path in paths:
            layer = self.model.get_submodule(path)
            out_f, in_f = linear_shape(layer.base_layer if isinstance(layer, MultiLoRALinear) else layer)
            key = PEFT_PREFIX + path
            if kind == "lora":
                expected[f"{key}.lora_A.weight"] = (config.r, in_f)  # type: ignore[union-attr]
                expected[f"{key}.lora_B.weight"] = (out_f, config.r)  # type: ignore[union-attr]
            else:
                expected[f"{key}.ia3_l"] = (1, in_f) if path in ff else (out_f, 1)
        state = checked_peft_state(state, expected, source)
        out: dict[str, tuple[Any, Any, Any, bool]] = {}
        for path in paths:
            key = PEFT_PREFIX + path
            if kind == "lora":
                out[path] = (state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"], None, False)
            else:
                out[path] = (None, None, state[f"{key}.ia3_l"], path in ff)
        return out

    def remove_adapter(self, name: str) -> None:
        """Unload `name`: its slot empties (other slots keep their ids) and unused layers are unwrapped."""
        slot = self.adapter_index(name)
        for path, layer in self.layers().items():
            layer.clear(slot)
            if not layer.used_slots:
                set_module(self.model, path, layer.base_layer)
        del self.slots[name], self.infos[name]

    def __repr__(self) -> str:
        return f"MultiAdapterModel({type(self.model).__name__}, slots={self.slots})"


def load_adapters(
    model: nn.Module,
    folders: Mapping[str, str | os.PathLike],
    expected_source_hash: str | None = None,
    force: bool = False,
) -> MultiAdapterModel:
    """Load every {name: folder} onto `model` at once; slots follow the mapping's order (1, 2, ...)."""
    bank = MultiAdapterModel(model)
    for name, folder in folders.items():
        bank.add_adapter(name, folder, expected_source_hash=expected_source_hash, force=force)
    return bank
