"""build_base: the model at a chosen precision, quantized once and cached.

Training picks the base by training memory (k bits); evaluation and serving pick it
independently (l bits): that independence is Post LoRA Restoration. Both go through
here. A quantized base is stored as a restora checkpoint under the cache folder, keyed
by the source weights' hash, the QuantSpec and the calibration set, so a grid
quantizes each (model, format, bits) once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from .models import LoadedModel, cache_dir, load_model
from .quant.checkpoint import load_quantized, save_quantized
from .quant.model import quantize_model
from .quant.spec import QuantSpec

__all__ = ["BaseChoice", "build_base", "build_loftq_base", "calibration_ids"]


@dataclass(frozen=True)
class BaseChoice:
    """Which base to build: a QuantSpec plus GPTQ's calibration set."""

    spec: QuantSpec
    calib_task: str = "sql"
    calib_samples: int = 500
    calib_max_len: int = 256
    seed: int = 0

    def key(self, source_hash: str) -> str:
        calib = [self.calib_task, self.calib_samples, self.calib_max_len, self.seed] if self.spec.format == "gptq" else None
        blob = json.dumps([source_hash, self.spec.to_dict(), calib], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def calibration_info(self) -> dict[str, Any] | None:
        if self.spec.format != "gptq":
            return None
        return {"task": self.calib_task, "samples": self.calib_samples, "max_len": self.calib_max_len, "seed": self.seed, "split": "train"}


def calibration_ids(tokenizer: Any, task: str, n: int, max_len: int, seed: int, data_dir: str | None) -> list[torch.Tensor]:
    """Token ids of n training rows of a task (never validation or test rows)."""
    from .data import calibration_rows, get_task

    t = get_task(task)
    rows = calibration_rows(t, n, seed=seed, data_dir=data_dir)
    return [tokenizer(t.text(r), return_tensors="pt", truncation=True, max_length=max_len)["input_ids"][0] for r in rows]


def build_base(model: str, choice: BaseChoice, data_dir: str | None = None, cache: bool = True) -> LoadedModel:
    """The source model `model` at precision `choice`: float, or quantized (from cache if possible)."""
    loaded = load_model(model)
    if loaded.manifest is not None:
        raise ValueError(f"{model} is a quantized checkpoint: give its source model to build other precisions")
    if choice.spec.is_float:
        return loaded
    folder = cache_dir() / "bases" / f"{choice.spec.label()}-{choice.key(loaded.source_hash)}"
    if cache and (folder / "restora_manifest.json").is_file():
        q = load_quantized(folder, expected_source_hash=loaded.source_hash)
        q.source = loaded.source
        return q
    calibration = None
    if choice.spec.format == "gptq":
        calibration = calibration_ids(loaded.tokenizer, choice.calib_task, choice.calib_samples, choice.calib_max_len, choice.seed, data_dir)
    quantize_model(loaded.model, choice.spec, calibration)
    if cache:
        provenance = {"source": loaded.source, "source_hash": loaded.source_hash, "calibration": choice.calibration_info()}
        save_quantized(loaded.model, loaded.tokenizer, folder, choice.spec, provenance)
    loaded.manifest = {"quantization": choice.spec.to_dict(), "source_hash": loaded.source_hash}
    return loaded


def build_loftq_base(
    model: str, spec: QuantSpec, rank: int, alpha: float, rslora: bool, targets: Any, iters: int
) -> LoadedModel:
    """LoftQ (SEEDS 001) on the LoRA target layers, plain `spec` quantization on the others.

    Deterministic (LoftQ's randomized SVD has its own seeded generator), so the base an
    adapter was trained on can be rebuilt exactly. `loaded.loftq` holds the per-layer
    LoftQResult (the initial lora_A / lora_B).
    """
    from .adapters.inject import select_targets
    from .adapters.loftq import LoftQConfig, loftq_init_model
    from .quant.linear import QuantLinear
    from .quant.model import quantizable_layers, set_module

    if spec.is_float:
        raise ValueError("init loftq needs a quantized base: pass --format and --bits")
    loaded = load_model(model)
    m = loaded.model
    names = select_targets(m, targets)
    fmt = "rtn" if spec.format == "gptq" else spec.format  # LoftQ has no calibration data
    results = loftq_init_model(m, LoftQConfig(bits=spec.bits, format=fmt, group_size=spec.group_size, iters=iters),
                               rank, alpha, names, use_rslora=rslora)
    for name in quantizable_layers(m):
        if not isinstance(m.get_submodule(name), QuantLinear):
            set_module(m, name, QuantLinear.from_linear(m.get_submodule(name), QuantSpec(fmt, spec.bits, spec.group_size)))
    loaded.loftq = results  # type: ignore[attr-defined]
    loaded.manifest = {"quantization": spec.to_dict(), "source_hash": loaded.source_hash, "loftq": True}
    return loaded
