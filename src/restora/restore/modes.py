"""Restoration modes: restore the base and keep what the adapter learned (beyond plain PLR).

Plain PLR (the PLR report) swaps the k-bit base W_k for an l-bit one W_l under the adapter.
On SmolLM2 that *hurt* at 3 and 4 bits (docs/plr-smollm2.md): the adapter co-adapts
to the k-bit base's activation statistics, not to its weight error. The modes:

    plain         every layer on W_l
    partial       only selected layers on W_l (by block range and/or module kind); the
                  rest keep W_k exactly
    bias-correct  every restored layer gets b = (W_k − W_l) E[x], with E[x] the layer's
                  mean input on a few training rows through the k-bit model + adapter, so
                  each layer's mean output is unchanged: E[W_l x + b] = E[W_k x]
                  (needs forward passes only; exact under merging, a bias is a bias)
    partial+bias  both
    mean-match    every restored layer (or the --restore-layers/--restore-modules subset) gets
                  b = E[W_k x_k] − E[W_l x_l], the inputs x_l taken in the restored model with the
                  earlier layers' biases applied, so the mean outputs match the k-bit model's along
                  the network, not only layer by layer (corrections.py; one batched forward of
                  each model over the calibration rows)
    loftq         LoftQ-initialised adapters: W_l + s·(BA − B₀A₀ + B_l A_l), the k-bit init fit
                  swapped for the l-bit one (restoration_loftq.py)
    auto          a search on the validation split over {keep the k-bit base, plain,
                  bias-correct, mean-match, partial+bias over halves / attention / MLP, and
                  loftq for LoftQ adapters} at each l,
                  then greedy per-block-group refinement; "keep" is a candidate, so on
                  validation it is never worse than the adapter on its own base. With
                  min_gain > 0 a restoration must also beat "keep" by that fraction of its
                  validation loss (a guard against validation noise: on SmolLM2 a 0.1% gain
                  did not carry over to the test rows). The
                  choice and every candidate's validation loss are returned as evidence.

With l = k every mode is the trained model itself (W_l = W_k, so b = 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from restora.adapters import load_adapter
from restora.core.modules import decoder_blocks, set_module
from restora.data import calibration_rows, encode_rows, get_task, split_rows
from restora.models.loaded import LoadedModel
from restora.quant.linear import weight_of
from restora.quant.model import quantizable_layers
from restora.restore.corrections import (
    BiasedLinear,
    fold_biases,
    mean_inputs,
    mean_match_biases,
    output_means,
)
from restora.restore.loftq import restore_loftq
from restora.restore.plr import (
    RestoreInfo,
    build_trained_base,
    read_provenance,
    restore_base,
)
from restora.train.loop import evaluate_loss

__all__ = ["RestorationMode", "MODES", "RestoreModeName", "restore_with_mode", "layer_selector"]

MODES = ("plain", "partial", "bias-correct", "partial+bias", "mean-match", "loftq", "auto")
RestoreModeName = Literal["plain", "partial", "bias-correct", "partial+bias", "mean-match", "loftq", "auto"]  # MODES, as a type


@dataclass(frozen=True)
class RestorationMode:
    """mode: one of MODES. layers: partial block range(s), e.g. "0-14" or "0-4,20-29".
    modules: partial module kind: "attn", "mlp" or a regex over layer names.
    calib_rows: training rows for E[x] (bias-correct). val_rows: validation rows (auto).
    auto_bits: restore levels auto may choose from (besides keeping k)."""

    mode: str = "plain"
    layers: str | None = None
    modules: str | None = None
    calib_rows: int = 64
    val_rows: int = 64
    auto_bits: tuple[int, ...] = (16,)
    min_gain: float = 0.0  # auto restores only if that beats keeping the k-bit base by this fraction

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"restore mode {self.mode!r} is unknown: expected one of {', '.join(MODES)}")
        if self.mode in ("partial", "partial+bias") and not (self.layers or self.modules):
            raise ValueError(f"restore mode {self.mode} needs --restore-layers and/or --restore-modules")
        if self.calib_rows <= 0 or self.val_rows <= 0:
            raise ValueError("calib_rows and val_rows must be positive")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")


def _block_of(name: str, prefixes: Sequence[str]) -> int | None:
    for i, p in enumerate(prefixes):
        if name.startswith(p + "."):
            return i
    return None


def _parse_ranges(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--restore-layers: {part!r} is not a block index or range like 0-14")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out |= set(range(a, b + 1))
    return out


def layer_selector(model: nn.Module, layers: str | None, modules: str | None) -> Callable[[str], bool]:
    """Predicate over layer names: in the chosen blocks and of the chosen kind."""
    blocks = decoder_blocks(model)
    ids = {id(b): n for n, b in model.named_modules()}
    prefixes = [ids[id(b)] for b in blocks]
    wanted = _parse_ranges(layers) if layers else None
    kind = None
    if modules == "attn":
        kind = re.compile(r"(self_attn|attn|attention)\.")
    elif modules == "mlp":
        kind = re.compile(r"(mlp|feed_forward|ffn)\.")
    elif modules:
        kind = re.compile(modules)

    def pick(name: str) -> bool:
        if wanted is not None and _block_of(name, prefixes) not in wanted:
            return False
        return kind is None or bool(kind.search(name))

    return pick


@dataclass
class _Parts:
    """Everything a candidate is assembled from: the two bases per layer and the bias terms."""

    names: list[str]
    base_l: dict[str, nn.Module]
    base_k: dict[str, nn.Module]
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # first-order b = (W_k − W_l) E[x_k]
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # mean-match: E[W_k x_k]
    tokenizer: Any = None
    texts: list[str] = field(default_factory=list)  # the calibration rows


def _base_name(name: str) -> str:
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def _prepare(loaded_l: LoadedModel, adapter_dir: Any, prov: dict, source: str, data_dir: str | None,
             need_bias: bool, calib_rows: int, seed: int, task: str, need_match: bool = False) -> _Parts:
    m_l = loaded_l.model
    trained = build_trained_base(prov, source, data_dir)
    m_k = trained.model  # no adapter yet: its layer names are the base layer paths
    names = []
    for n in quantizable_layers(m_k):
        wrapped = hasattr(m_l.get_submodule(n), "base_layer")
        names.append(n + ".base_layer" if wrapped else n)  # the base layer's path in the adapted model
    parts = _Parts(names, {n: m_l.get_submodule(n) for n in names}, {n: m_k.get_submodule(_base_name(n)) for n in names})
    if need_bias or need_match:
        load_adapter(m_k, adapter_dir, expected_source_hash=trained.source_hash, force=True)
        t = get_task(task)
        parts.texts = [t.text(r) for r in calibration_rows(t, calib_rows, seed=seed, data_dir=data_dir)]
        parts.tokenizer = trained.tokenizer
        if need_match:
            parts.targets = output_means(m_k, trained.tokenizer, parts.texts, names)
        if need_bias:
            means = mean_inputs(m_k, trained.tokenizer, parts.texts, names)
            for n in tqdm(names, desc="bias correction", leave=False):
                parts.bias[n] = (weight_of(parts.base_k[n]) - weight_of(parts.base_l[n])) @ means[n]  # (out,)
    return parts


def _assemble(model: nn.Module, parts: _Parts, restored: set[str], correction: str | None) -> None:
    """Put W_l (with `correction`: None, "bias" or "mean-match") on `restored` layers and W_k on the rest."""
    for n in parts.names:
        if n in restored:
            layer = parts.base_l[n]
            if correction == "bias" and n in parts.bias:
                layer = BiasedLinear(layer, parts.bias[n])
        else:
            layer = parts.base_k[n]
        set_module(model, n, layer)
    if correction == "mean-match" and restored:  # biases depend on the assembled model: computed on it
        order = [n for n in parts.names if n in restored]
        biases = mean_match_biases(model, parts.targets, parts.tokenizer, parts.texts, order)
        for n in order:
            set_module(model, n, BiasedLinear(parts.base_l[n], biases[n]))


def restore_with_mode(
    adapter_dir: Any,
    bits: int,
    mode: RestorationMode,
    format: str | None = None,
    model: str | None = None,
    force: bool = False,
    data_dir: str | None = None,
    seed: int = 0,
) -> tuple[LoadedModel, RestoreInfo, dict[str, Any]]:
    """The adapter on a base restored with `mode`; returns the model, the restore info and a record."""
    prov = read_provenance(adapter_dir) or {}
    task = (prov.get("training") or {}).get("task") or "sql"
    if mode.mode == "loftq":
        return restore_loftq(adapter_dir, bits, format, model=model, force=force, data_dir=data_dir)
    if mode.mode == "auto":
        return _auto(adapter_dir, mode, format, model, force, data_dir, seed, task, prov)
    loaded, info = restore_base(adapter_dir, bits, format, model=model, force=force, data_dir=data_dir, seed=seed)
    record: dict[str, Any] = {"mode": mode.mode, "restore_bits": info.restore_spec.bits}
    if mode.mode == "plain" or (info.train_spec is not None and info.restore_spec == info.train_spec):
        return loaded, info, record
    source = model or prov.get("base_model") or loaded.source
    need_bias = mode.mode in ("bias-correct", "partial+bias")
    need_match = mode.mode == "mean-match"
    parts = _prepare(loaded, adapter_dir, prov, source, data_dir, need_bias, mode.calib_rows, seed, task, need_match)
    subset = mode.mode.startswith("partial") or (need_match and bool(mode.layers or mode.modules))
    pick = layer_selector(loaded.model, mode.layers, mode.modules) if subset else (lambda n: True)
    restored = {n for n in parts.names if pick(n)}
    _assemble(loaded.model, parts, restored, "mean-match" if need_match else "bias" if need_bias else None)
    fold_biases(loaded.model)
    record.update({"restored_layers": len(restored), "total_layers": len(parts.names), "layers": mode.layers,
                   "modules": mode.modules})
    return loaded, info, record


def _auto(adapter_dir: Any, mode: RestorationMode, format: str | None, model: str | None, force: bool,
          data_dir: str | None, seed: int, task: str, prov: dict) -> tuple[LoadedModel, RestoreInfo, dict[str, Any]]:
    train_bits = int((prov.get("quantization") or {}).get("bits", 16))
    levels = sorted(b for b in mode.auto_bits if b > train_bits) or [train_bits]
    evidence: list[dict[str, Any]] = []
    best: tuple[float, Any] | None = None
    val = split_rows(task, seed, data_dir).validation[: mode.val_rows]
    final: tuple[LoadedModel, RestoreInfo] | None = None
    first: tuple[LoadedModel, RestoreInfo, nn.Module, _Parts] | None = None  # where "keep" can be rebuilt
    for level in levels:
        loaded, info = restore_base(adapter_dir, level, format, model=model, force=force, data_dir=data_dir, seed=seed)
        m, tok = loaded.model, loaded.tokenizer
        enc = encode_rows(task, tok, val, 512)
        source = model or prov.get("base_model") or loaded.source
        parts = _prepare(loaded, adapter_dir, prov, source, data_dir, True, mode.calib_rows, seed, task, True)
        first = first or (loaded, info, m, parts)
        everything = set(parts.names)
        pick_attn = layer_selector(m, None, "attn")
        pick_mlp = layer_selector(m, None, "mlp")
        n_blocks = len(decoder_blocks(m))
        half = layer_selector(m, f"0-{n_blocks // 2 - 1}", None)
        # "keep" is the same model at every level: scored once, at the first
        candidates: list[tuple[str, set[str], str | None]] = [("keep k-bit base", set(), None)] if level == levels[0] else []
        candidates += [
            (f"plain PLR{level}", everything, None),
            (f"bias-correct {level}", everything, "bias"),
            (f"mean-match {level}", everything, "mean-match"),
            (f"partial first half + bias {level}", {n for n in everything if half(n)}, "bias"),
            (f"partial second half + bias {level}", {n for n in everything if not half(n)}, "bias"),
            (f"partial attention + bias {level}", {n for n in everything if pick_attn(n)}, "bias"),
            (f"partial MLP + bias {level}", {n for n in everything if pick_mlp(n)}, "bias"),
        ]

        def score(restored: set[str], correction: str | None) -> float:
            _assemble(m, parts, restored, correction)
            return evaluate_loss(m, enc, tok.pad_token_id, 8, True)

        for name, restored, correction in tqdm(candidates, desc=f"auto l={level}", leave=False):
            v = score(restored, correction)
            evidence.append({"candidate": name, "val_loss": v, "restored_layers": len(restored)})
            if best is None or v < best[0]:
                best = (v, (level if restored else train_bits, name, restored, correction))
        # greedy refinement over groups of blocks, starting from this level's best corrected candidate
        assert best is not None
        if best[1][0] == level and best[1][3]:
            correction = best[1][3]
            groups = max(1, min(6, n_blocks))
            size = -(-n_blocks // groups)
            current = set(best[1][2])
            for g in range(groups):
                sel = layer_selector(m, f"{g * size}-{min(n_blocks, (g + 1) * size) - 1}", None)
                group = {n for n in everything if sel(n)}
                trial = current - group if group <= current else current | group
                v = score(trial, correction)
                name = f"greedy blocks {g * size}-{min(n_blocks, (g + 1) * size) - 1} toggled, l={level} ({correction})"
                evidence.append({"candidate": name, "val_loss": v, "restored_layers": len(trial)})
                if v < best[0]:
                    best = (v, (level, name, trial, correction))
                    current = trial
        chosen_level, chosen_name, restored, correction = best[1]
        if chosen_level == level or (chosen_level == train_bits and not restored and final is None):
            _assemble(m, parts, restored, correction)
            fold_biases(m)
            final = (loaded, info)
        if (prov.get("training") or {}).get("init") == "loftq":
            lq, lq_info, _ = restore_loftq(adapter_dir, level, format, model=model, force=force, data_dir=data_dir)
            v = evaluate_loss(lq.model, encode_rows(task, lq.tokenizer, val, 512), lq.tokenizer.pad_token_id, 8, True)
            name = f"loftq {level}"
            evidence.append({"candidate": name, "val_loss": v, "restored_layers": len(everything)})
            if v < best[0]:
                best = (v, (level, name, everything, None))
                final = (lq, lq_info)
    assert best is not None and final is not None and first is not None
    keep_loss = evidence[0]["val_loss"]  # the first candidate is always "keep k-bit base"
    if best[1][2] and best[0] > keep_loss * (1 - mode.min_gain):  # a gain this small is validation noise
        loaded, info, m, parts = first
        _assemble(m, parts, set(), None)
        final, best = (loaded, info), (keep_loss, (train_bits, f"keep k-bit base (best restoration, {best[1][1]},"
                                                   f" gained under {100 * mode.min_gain:g}%)", set(), None))
    loaded, info = final
    record = {"mode": "auto", "chosen": best[1][1], "restore_bits": best[1][0], "val_loss": best[0],
              "val_rows": len(val), "min_gain": mode.min_gain, "evidence": evidence}
    return loaded, info, record
