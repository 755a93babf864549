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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from restora.adapters.inject import select_targets
from restora.adapters.loftq import LoftQConfig, loftq_init_model
from restora.core.cache import cache_dir
from restora.core.modules import decoder_blocks, set_module
from restora.data import calibration_rows, get_task
from restora.models.load import MANIFEST, load_model, open_source, resolve_source
from restora.models.loaded import LoadedModel
from restora.models.quantized import load_quantized
from restora.models.stream import StreamingLoad
from restora.quant.checkpoint import save_quantized
from restora.quant.gptq import gptq_quantize_model
from restora.quant.linear import QuantLinear
from restora.quant.model import check_spec_fits, quantizable_layers
from restora.quant.spec import QuantSpec

__all__ = ["CALIB_MAX_LEN", "BaseChoice", "base_choice", "build_base", "build_loftq_base", "calibration_ids", "stream_quantize"]


CALIB_MAX_LEN = 256  # tokens per GPTQ calibration row of a training or restored base


@dataclass(frozen=True)
class BaseChoice:
    """Which base to build: a QuantSpec plus GPTQ's calibration set."""

    spec: QuantSpec
    calib_task: str = "sql"
    calib_samples: int = 500
    calib_max_len: int = CALIB_MAX_LEN
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

    t = get_task(task)
    rows = calibration_rows(t, n, seed=seed, data_dir=data_dir)
    return [tokenizer(t.text(r), return_tensors="pt", truncation=True, max_length=max_len)["input_ids"][0] for r in rows]


def stream_quantize(
    load: StreamingLoad,
    spec: QuantSpec,
    calibration: list[torch.Tensor] | None = None,
    progress: bool = True,
    before_block: Callable[[int, nn.Module], None] | None = None,
    after_block: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Quantize a model as its weights stream in (restora.models.stream); returns the loaded, quantized model.

    NF4/FP4, int8 and RTN replace each linear layer as soon as its weight has arrived, so one layer's float
    weight is resident at a time; GPTQ holds one decoder block's. `before_block(b, block)` sees block b in float
    (all of it loaded), `after_block(b, block)` quantized: the hooks streamed perplexity uses.
    """
    model = load.model
    names = quantizable_layers(model)
    check_spec_fits(model, spec, names)
    load.outside_blocks()
    if spec.format == "gptq":
        if not calibration:
            raise ValueError("gptq needs calibration data: pass calibration rows (e.g. --calib-task sql)")

        def fill(b: int, block: nn.Module) -> None:
            load.block(b)
            if before_block is not None:
                before_block(b, block)

        gptq_quantize_model(model, spec, calibration, progress, before_block=fill, after_block=after_block)
        return load.finish()
    targets = set(names)
    bar = tqdm(total=len(names), desc=f"quantize {spec.label()}", disable=not progress, leave=False)

    def quantize_layer(name: str, module: nn.Module) -> None:
        if name in targets:
            set_module(model, name, QuantLinear.from_linear(module, spec))
            bar.update(1)

    blocks = decoder_blocks(model)
    for b in range(load.num_blocks):
        if before_block is None:
            load.block(b, quantize_layer)
        else:
            load.block(b)
            before_block(b, blocks[b])
            for name in [n for n in names if n.startswith(f"{load.prefix}{b}.")]:
                quantize_layer(name, model.get_submodule(name))
        if after_block is not None:
            after_block(b, blocks[b])
    bar.close()
    return load.finish()


def build_base(model: str, choice: BaseChoice, data_dir: str | None = None, cache: bool = True,
               mapped: bool = False) -> LoadedModel:
    """The source model `model` at precision `choice`: float, or quantized (from cache if possible).

    The source streams from its files (restora.models.stream); a quantized base is quantized as it streams in, so
    the float model is never whole in memory. `mapped` returns the base with its weights mapped from a file (the
    source's, or the cached checkpoint's), for offloading (restora.models.offload).
    """
    if mapped and not cache and not choice.spec.is_float:
        raise ValueError("a mapped quantized base is read from restora's cache: it needs cache=True")
    if isinstance(resolve_source(model), Path) and (resolve_source(model) / MANIFEST).is_file():
        raise ValueError(f"{model} is a quantized checkpoint: give its source model to build other precisions")
    if choice.spec.is_float:
        return load_model(model, mapped=mapped)
    source = open_source(model)
    load = source.start()
    digest = source.digest(load.model)
    folder = cache_dir() / "bases" / f"{choice.spec.label()}-{choice.key(digest)}"
    if cache and (folder / "restora_manifest.json").is_file():
        q = load_quantized(folder, expected_source_hash=digest, mapped=mapped)
        q.source = model
        return q
    tok = source.tokenizer()
    calibration = None
    if choice.spec.format == "gptq":
        calibration = calibration_ids(tok, choice.calib_task, choice.calib_samples, choice.calib_max_len, choice.seed, data_dir)
    m = stream_quantize(load, choice.spec, calibration)
    loaded = LoadedModel(m, tok, model, digest, source.folder)
    if cache:
        provenance = {"source": loaded.source, "source_hash": loaded.source_hash, "calibration": choice.calibration_info()}
        save_quantized(loaded.model, loaded.tokenizer, folder, choice.spec, provenance)
    loaded.manifest = {"quantization": choice.spec.to_dict(), "source_hash": loaded.source_hash}
    if mapped:  # the checkpoint just written, read back as views of its file
        del loaded, m
        q = load_quantized(folder, expected_source_hash=digest, mapped=True)
        q.source = model
        return q
    return loaded


def build_loftq_base(
    model: str, spec: QuantSpec, rank: int, alpha: float, rslora: bool, targets: Any, iters: int
) -> LoadedModel:
    """LoftQ (Li et al. 2023) on the LoRA target layers, plain `spec` quantization on the others.

    Deterministic (LoftQ's randomized SVD has its own seeded generator), so the base an
    adapter was trained on can be rebuilt exactly. `loaded.loftq` holds the per-layer
    LoftQResult (the initial lora_A / lora_B).
    """

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


def base_choice(format: str, bits: int, group_size: int, calib_task: str, calib_samples: int, seed: int) -> BaseChoice:
    """The base for FORMAT/BITS (float = the 16-bit model) with GPTQ calibration on `calib_task`."""
    if format == "float":
        bits = 16
    return BaseChoice(QuantSpec(format=format, bits=bits, group_size=group_size), calib_task, calib_samples,
                      CALIB_MAX_LEN, seed)
