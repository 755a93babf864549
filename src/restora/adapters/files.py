"""Adapter folders: PEFT-compatible files plus a restora.json provenance record.

A folder holds

    adapter_config.json         PEFT's config (peft_type LORA or IA3, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors   PEFT's keys: base_model.model.<path>.lora_A.weight / .lora_B.weight / .ia3_l
    restora.json                provenance: base model id, hash of the base's source
                                weights, the quantization the adapter was trained on, the adapter
                                settings, training settings and metrics. PEFT ignores it.

so real `peft` loads a restora adapter and restora loads a real PEFT adapter (LoRA, rsLoRA,
(IA)³). The three files are replaced together (restora.core.atomic.atomic_files): a reader sees
the old three or the new three, also after a kill, while the folder's other files (checkpoint/,
metrics.jsonl) stay. Loading checks the config, the targets, the tensor keys and
shapes, and (when asked) the base's source hash, with one-line errors naming the file.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from restora import __version__
from restora.adapters.ia3 import IA3Config, IA3Linear
from restora.adapters.inject import (
    adapter_state_dict,
    add_ia3,
    add_lora,
    load_adapter_state_dict,
    remove_adapters,
    target_names,
)
from restora.adapters.lora import LoRAConfig, LoRALinear, adapter_modules
from restora.core.atomic import atomic_files, recover
from restora.core.jsonfile import read_json_object
from restora.quant.checkpoint import check_safetensors
from restora.quant.linear import quantization_of
from restora.quant.spec import QuantSpec

__all__ = ["AdapterInfo", "save_adapter", "load_adapter", "read_adapter_config", "read_adapter_weights",
           "read_provenance", "CONFIG_NAME", "WEIGHTS_NAME", "PROVENANCE_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROVENANCE_NAME = "restora.json"
PROVENANCE_KEYS = ("base_model", "source_hash", "quantization", "training", "metrics", "notes")

# adapter_config.json fields restora reads.
_USED = {
    "LORA": {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights",
             "fan_in_fan_out", "bias", "task_type", "base_model_name_or_path"},
    "IA3": {"peft_type", "target_modules", "feedforward_modules", "init_ia3_weights", "fan_in_fan_out", "task_type",
            "base_model_name_or_path"},
}
# Fields that never change what the saved tensors compute.
_HARMLESS = {"peft_version", "revision", "inference_mode", "auto_mapping", "megatron_core", "qalora_group_size",
             "loftq_config", "corda_config", "eva_config", "lora_ga_config", "ensure_weight_tying"}
# Fields that are harmless only at their default value (a feature restora does not implement otherwise).
_DEFAULT_ONLY: dict[str, Any] = {
    "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "layer_replication": None, "exclude_modules": None,
    "trainable_token_indices": None, "target_parameters": None, "use_qalora": False, "use_bdlora": None,
    "alora_invocation_tokens": None, "arrow_config": None, "kasa_config": None, "monteclora_config": None,
    "velora_config": None, "megatron_config": None,
}
_EMPTY = (None, False, {}, [], "")
_LORA_INITS = {True: "default", False: "default", "gaussian": "gaussian", "loftq": "default"}


@dataclass
class AdapterInfo:
    """What load_adapter attached: kind ("lora" / "ia3"), wrapped paths, settings, provenance (or None)."""

    kind: str
    paths: list[str]
    config: LoRAConfig | IA3Config
    provenance: dict[str, Any] | None
    folder: Path


def _kind(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]]:
    found = list(adapter_modules(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no adapter to save: call add_lora or add_ia3 first")
    kinds = {type(m) for _, m in found}
    if kinds == {LoRALinear}:
        return "lora", found
    if kinds == {IA3Linear}:
        return "ia3", found
    raise ValueError(f"cannot save a mix of adapter kinds in one folder: {sorted(k.__name__ for k in kinds)}")


def _fan_in_fan_out(model: nn.Module) -> bool:
    """GPT-2 stores weights (in, out) as Conv1D; PEFT's config records that."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return model_type == "gpt2" or any(type(m).__name__ == "Conv1D" for m in model.modules())


def _peft_config(model: nn.Module, kind: str, found: list[tuple[str, nn.Module]], base_id: str | None) -> dict:
    paths = [p for p, _ in found]
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_id, "fan_in_fan_out": _fan_in_fan_out(model),
              "inference_mode": True, "modules_to_save": None, "revision": None}
    if kind == "ia3":
        targets = target_names(model, paths)
        ff = target_names(model, [p for p, m in found if m.is_feedforward])
        targets = sorted(set(targets) | set(ff))  # PEFT wants feedforward_modules ⊆ target_modules
        return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ff, "init_ia3_weights": True,
                **common}
    configs = {(m.config.r, m.config.alpha, m.config.dropout, m.config.use_rslora, m.config.init) for _, m in found}
    if len(configs) > 1:
        raise ValueError(f"LoRA layers have different settings {sorted(configs)}: one folder holds one LoRA config")
    cfg = found[0][1].config
    return {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora, "init_lora_weights": True if cfg.init == "default" else cfg.init,
            "target_modules": target_names(model, paths), "bias": "none", "use_dora": False, "lora_bias": False,
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, **common}


def _quantization_of(found: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    return quantization_of(found[0][1].base_layer)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, provenance: dict[str, Any] | None = None) -> Path:
    """Write the model's adapter to `out_dir` as a PEFT folder plus restora.json; returns the folder.

    `provenance` may hold base_model (id), source_hash, quantization (a dict or QuantSpec; by
    default read from the wrapped layers), training (settings) and metrics.
    """
    provenance = dict(provenance or {})
    unknown = sorted(set(provenance) - set(PROVENANCE_KEYS))
    if unknown:
        raise ValueError(f"unknown provenance fields {unknown}: expected some of {list(PROVENANCE_KEYS)}")
    kind, found = _kind(model)
    if any(m.merged for _, m in found):
        raise ValueError("cannot save a merged adapter: call unmerge() first")
    quant = provenance.get("quantization")
    if isinstance(quant, QuantSpec):
        quant = quant.to_dict()
    paths = [p for p, _ in found]
    if kind == "lora":
        settings: dict[str, Any] = {"kind": "lora", **asdict(found[0][1].config), "targets": paths}
    else:
        settings = {"kind": "ia3", "targets": paths, "feedforward": [p for p, m in found if m.is_feedforward]}
    record = {
        "restora_version": __version__,
        "base_model": provenance.get("base_model"),
        "source_hash": provenance.get("source_hash"),
        "quantization": quant if quant is not None else _quantization_of(found),
        "adapter": settings,
        "training": provenance.get("training"),
        "metrics": provenance.get("metrics"),
        **({"notes": provenance["notes"]} if "notes" in provenance else {}),
    }
    config = _peft_config(model, kind, found, provenance.get("base_model"))

    out = Path(out_dir)
    with atomic_files(out) as stage:  # all three files replace the old ones together (restora.core.atomic)
        save_file(adapter_state_dict(model), str(stage / WEIGHTS_NAME), metadata={"format": "pt"})
        (stage / PROVENANCE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_adapter_config(folder: str | os.PathLike) -> tuple[str, LoRAConfig | IA3Config]:
    """Parse and check a PEFT adapter_config.json: ("lora" | "ia3", the restora config)."""
    path = recover(folder) / CONFIG_NAME
    raw = read_json_object(path, ": no such file (not an adapter folder)")
    peft_type = raw.get("peft_type")
    if peft_type not in _USED:
        raise ValueError(f"{path}: peft_type {peft_type!r} is not supported: expected LORA or IA3")
    unknown = sorted(k for k in raw if k not in _USED[peft_type] and k not in _HARMLESS and k not in _DEFAULT_ONLY)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}")
    unsupported = sorted(k for k in raw if k in _DEFAULT_ONLY and raw[k] not in _EMPTY)
    if unsupported:
        raise ValueError(f"{path}: unsupported settings {', '.join(f'{k}={raw[k]!r}' for k in unsupported)}")
    targets = raw.get("target_modules")
    if isinstance(targets, str) and targets not in ("all-linear",):
        targets = f"(?:{targets})"  # a PEFT regex, never one of restora's preset words
    if targets is None:
        raise ValueError(f"{path}: target_modules is missing")
    try:
        if peft_type == "IA3":
            ff = raw.get("feedforward_modules")
            if isinstance(ff, str):
                ff = f"(?:{ff})"
            return "ia3", IA3Config(target_modules=targets, feedforward_modules=ff)
        if raw.get("bias", "none") != "none":
            raise ValueError(f"bias={raw['bias']!r} is not supported: expected 'none'")
        init = raw.get("init_lora_weights", True)
        if init not in _LORA_INITS:
            raise ValueError(f"init_lora_weights={init!r} is not supported: expected true, false, 'gaussian' or 'loftq'")
        for key, kinds, expected in (("r", (int,), "a positive integer"), ("lora_alpha", (int, float), "a number"),
                                     ("lora_dropout", (int, float), "a number in [0, 1)")):
            if key not in raw and key != "lora_dropout":
                raise ValueError(f"field {key!r} is missing: expected {expected}")
            value = raw.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"field {key!r} is {value!r} ({type(value).__name__}): expected {expected}")
        return "lora", LoRAConfig(
            r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
            use_rslora=bool(raw.get("use_rslora", False)), init=_LORA_INITS[init], target_modules=targets,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def read_provenance(
    folder: str | os.PathLike, expected_source_hash: str | None = None, force: bool = False
) -> dict[str, Any] | None:
    """restora.json of an adapter folder (None for a plain PEFT folder).

    With `expected_source_hash`, an adapter recorded against another base is refused
    (force=True downgrades that to a warning); an adapter without a record only warns.
    """
    folder = recover(folder)
    prov_path = folder / PROVENANCE_NAME
    provenance = None
    if prov_path.is_file():
        provenance = read_json_object(prov_path)
    if expected_source_hash is not None:
        recorded = (provenance or {}).get("source_hash")
        if recorded is None:
            warnings.warn(f"{folder}: no source hash recorded, cannot check the adapter belongs to this base", stacklevel=3)
        elif recorded != expected_source_hash:
            msg = f"{prov_path}: adapter was trained on base {recorded}, this base is {expected_source_hash}"
            if not force:
                raise ValueError(msg + " (force=True to load anyway)")
            warnings.warn(msg + " (loading anyway: force=True)", stacklevel=3)
    return provenance


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, Any]:
    """The tensors of adapter_model.safetensors, with one-line errors for a missing, truncated or corrupt file."""
    path = recover(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    check_safetensors(path)
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: cannot read the tensors ({str(e).splitlines()[0]})") from None


def load_adapter(
    model: nn.Module, folder: str | os.PathLike, expected_source_hash: str | None = None, force: bool = False
) -> AdapterInfo:
    """Attach the adapter in `folder` (restora or plain PEFT) to `model` and load its weights.

    With `expected_source_hash`, a restora.json recording another base hash is refused
    (force=True downgrades that to a warning). On any error the model is left as it was.
    """
    folder = recover(folder)
    kind, config = read_adapter_config(folder)
    provenance = read_provenance(folder, expected_source_hash, force)
    weights_path = folder / WEIGHTS_NAME
    state = read_adapter_weights(folder)
    if any(True for _ in adapter_modules(model)):
        raise ValueError(f"{type(model).__name__} already has adapters: remove_adapters() before loading {folder}")
    config_path = folder / CONFIG_NAME
    try:
        paths = add_lora(model, config) if kind == "lora" else add_ia3(model, config)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    try:
        load_adapter_state_dict(model, state, source=str(weights_path))
    except Exception:
        remove_adapters(model)
        raise
    return AdapterInfo(kind=kind, paths=paths, config=config, provenance=provenance, folder=folder)

