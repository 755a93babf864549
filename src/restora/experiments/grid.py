"""The PLR experiment grid: methods × train bits × restore bits × tasks (× seeds).

    for each (task, method, train bits k, seed):       one training run ("unit")
        train an adapter on the k-bit base             (skipped when already done)
        for each restore level l in {k} ∪ {l ≥ k}:     one evaluation ("cell")
            evaluate the same adapter on the l-bit base (skipped when already done)

Quantized bases are cached by restora.models.bases (one quantization per model/format/bits),
every unit and cell writes its result atomically, and a rerun skips finished work, so a
killed grid resumes. `--shard i/n` (or a Slurm / PBS array index) runs every n-th unit.
`collect` merges whatever cells exist into results.csv / results.json, a table laid out
like the PLR report's Table 1, and plr.png.

Config (TOML):

    model = "smollm2-135m"
    tasks = ["sql"]
    seeds = [0]
    restore_bits = [3, 4, 8, 16]          # l levels tried above each k
    [[methods]]                           # one entry per method
    name = "gptq"  format = "gptq"  bits = [4, 3]  init = "default"
    train = { epochs = 3, targets = "all" }   # optional: this method's overrides of [train]
    [train]                               # restora train settings (rank, alpha, targets, epochs, lr, ...)
    [eval]                                # restora eval's scoring settings (EvalSettings: split, limit,
                                          # max_new_tokens, batch_size, generate, materialize, speculate,
                                          # compile) and the grid's own: loss_limit, restore_format,
                                          # restore_modes, mode_bits, auto_min_gain, merge_dtypes, merge_limit
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from restora.core.atomic import write_text_atomic
from restora.core.settings import settings_from
from restora.data import encode_rows, get_task, task_split
from restora.experiments.report import write_reports
from restora.experiments.study import write_study
from restora.infer.evaluate import evaluate_task
from restora.infer.settings import EvalSettings
from restora.quant.spec import SUPPORTED_BITS
from restora.restore.modes import MODES, RestorationMode, restore_with_mode
from restora.restore.plr import dequantize_model, merge_and_unload, restore_base
from restora.train.config import SETTING_GROUPS, group_settings
from restora.train.loss import row_losses
from restora.train.recipe import train_adapter as train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["GridConfig", "GridEvalSettings", "Unit", "load_grid_config", "plan_units", "run_grid", "collect", "parse_shard"]

_TOP = {"model", "tasks", "seeds", "restore_bits", "methods", "train", "eval", "data_dir"}
_METHOD = {"name", "format", "bits", "init", "group_size", "train", "seeds", "eval", "tasks"}
# [train] keys: train_adapter's adapter kind and the fields of its settings groups, but those a method or unit sets
_UNIT_SET = {"format", "bits", "group_size", "init", "seed"}
_TRAIN = {"adapter"} | {f.name for cls in SETTING_GROUPS.values() for f in fields(cls)} - _UNIT_SET
_MERGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the restorations a grid cell can name ("partial" modes need layer ranges the grid does not take), and "trained":
# the adapter merged into its dequantized k-bit base
_GRID_MODES = (*(m for m in MODES if not m.startswith("partial")), "trained")


@dataclass(frozen=True)
class GridEvalSettings:
    """The grid's own [eval] keys, beside the scoring settings it shares with `restora eval` (EvalSettings).

    Args:
        loss_limit: log loss over the first N test rows (at least `limit`; unset: `limit`; 0: all).
        restore_format: the format of bases restored above k and below 16 bits (unset: the method's); where the
            format has no such level, int8 at 8 bits and RTN otherwise.
        restore_modes: the restorations evaluated: plain, bias-correct, mean-match, loftq (LoftQ units only) and
            auto above k, and "trained" (the adapter merged into its dequantized k-bit base) at k.
        mode_bits: the levels at which modes other than plain are evaluated (unset: every level).
        auto_min_gain: the validation gain auto needs before it restores.
        merge_dtypes: storage dtypes in which the merged weights are also scored (float32, bfloat16, float16).
        merge_limit: those merged scores over the first N test rows (unset: all scored rows).
    """

    loss_limit: int | None = None
    restore_format: str | None = None
    restore_modes: tuple[str, ...] = ("plain",)
    mode_bits: tuple[int, ...] | None = None
    auto_min_gain: float = 0.0
    merge_dtypes: tuple[str, ...] = ()
    merge_limit: int | None = None

    def __post_init__(self) -> None:
        for name, value, known in (("restore_modes", self.restore_modes, _GRID_MODES),
                                   ("merge_dtypes", self.merge_dtypes, tuple(_MERGE_DTYPES))):
            bad = [v for v in value if v not in known]
            if bad:
                raise ValueError(f"{name}: {bad[0]!r} is unknown: expected some of {', '.join(known)}")
        quantized = [f for f in SUPPORTED_BITS if f != "float"]
        if self.restore_format is not None and self.restore_format not in quantized:
            raise ValueError(f"restore_format must be one of {', '.join(quantized)}, got {self.restore_format!r}")
        if not 0 <= self.auto_min_gain < 1:
            raise ValueError(f"auto_min_gain must be in [0, 1), got {self.auto_min_gain}")
        for name in ("loss_limit", "merge_limit"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be 0 (all rows) or more, got {getattr(self, name)}")
        levels = sorted(set().union(*SUPPORTED_BITS.values()))
        if self.mode_bits is not None and any(b not in levels for b in self.mode_bits):
            raise ValueError(f"mode_bits must be restore levels ({', '.join(map(str, levels))}), "
                             f"got {list(self.mode_bits)}")


# [eval]: how a split is scored (EvalSettings, shared with `restora eval`), plus the grid's own keys
_GRID_EVAL = {f.name for f in fields(GridEvalSettings)}
_EVAL = _GRID_EVAL | {f.name for f in fields(EvalSettings)}


@dataclass(frozen=True)
class Method:
    name: str
    format: str
    bits: tuple[int, ...]
    init: str = "default"
    group_size: int = 64
    train: tuple[tuple[str, Any], ...] = ()  # overrides of the config's [train] for this method
    seeds: tuple[int, ...] | None = None  # this method's seeds (None: the config's)
    eval: tuple[tuple[str, Any], ...] = ()  # overrides of the config's [eval] for this method
    tasks: tuple[str, ...] | None = None  # this method's tasks (None: the config's)


@dataclass
class GridConfig:
    model: str
    tasks: list[str]
    methods: list[Method]
    seeds: list[int] = field(default_factory=lambda: [0])
    restore_bits: list[int] = field(default_factory=lambda: [16])
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None


def _check_keys(where: str, got: dict[str, Any], allowed: set[str], path: str) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise ValueError(f"{path}: unknown key {where}{extra[0]!r}: expected one of {sorted(allowed)}")


def load_grid_config(path: str | Path) -> GridConfig:
    """Parse and check a grid TOML file; errors name the offending key."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"grid config {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML ({e})") from None
    _check_keys("", raw, _TOP, str(p))
    for key in ("model", "tasks", "methods"):
        if key not in raw:
            raise ValueError(f"{p}: key {key!r} is missing")
    if not isinstance(raw["tasks"], list) or not raw["tasks"]:
        raise ValueError(f"{p}: key 'tasks' must be a non-empty list")
    methods = []
    for i, m in enumerate(raw["methods"]):
        _check_keys(f"methods[{i}].", m, _METHOD, str(p))
        for key in ("name", "format", "bits"):
            if key not in m:
                raise ValueError(f"{p}: key methods[{i}].{key} is missing")
        bits = m["bits"] if isinstance(m["bits"], list) else [m["bits"]]
        if m["format"] == "float" and bits != [16]:
            raise ValueError(f"{p}: key methods[{i}].bits must be [16] for format float")
        overrides = m.get("train", {})
        if not isinstance(overrides, dict):
            raise ValueError(f"{p}: key methods[{i}].train must be a table of [train] settings")
        _check_keys(f"methods[{i}].train.", overrides, _TRAIN, str(p))
        same = [prev for prev in methods if prev.name == m["name"]]
        default_seeds = [int(x) for x in raw.get("seeds", [0])]
        default_tasks = [str(t) for t in raw.get("tasks", [])]
        runs = {(t, int(b), int(s)) for t in m.get("tasks", default_tasks) for b in bits
                for s in m.get("seeds", default_seeds)}
        twice = sorted(runs & {(t, b, s) for prev in same for t in (prev.tasks if prev.tasks is not None else default_tasks)
                               for b in prev.bits
                               for s in (prev.seeds if prev.seeds is not None else default_seeds)})
        if twice:  # one name over several entries orders its (task, bits, seed) runs by priority; each is one unit
            raise ValueError(f"{p}: methods[{i}].name {m['name']!r} is used twice for task {twice[0][0]} at "
                             f"{twice[0][1]} bits, seed {twice[0][2]}: a method's (task, bits, seed) runs must be unique")
        if same and any((prev.format, prev.init, prev.group_size, prev.train)
                        != (m["format"], m.get("init", "default"), int(m.get("group_size", 64)),
                            tuple(sorted(m.get("train", {}).items()))) for prev in same):
            raise ValueError(f"{p}: methods[{i}].name {m['name']!r} is used twice with different settings: "
                             "entries of one name differ only in tasks, bits, seeds and eval")
        evals = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in m.get("eval", {}).items()))
        if any(set(prev.bits) & {int(b) for b in bits} and prev.eval != evals for prev in same):
            raise ValueError(f"{p}: methods[{i}].name {m['name']!r} repeats bits of an entry with other eval "
                             "settings: the seeds of one (name, bits) are pooled, so they must be evaluated alike")
        seeds = m.get("seeds")
        eval_overrides = m.get("eval", {})
        if not isinstance(eval_overrides, dict):
            raise ValueError(f"{p}: key methods[{i}].eval must be a table of [eval] settings")
        _check_keys(f"methods[{i}].eval.", eval_overrides, _EVAL, str(p))
        methods.append(Method(m["name"], m["format"], tuple(int(b) for b in bits), m.get("init", "default"),
                              int(m.get("group_size", 64)), tuple(sorted(overrides.items())),
                              None if seeds is None else tuple(int(x) for x in seeds),
                              tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in eval_overrides.items())),
                              None if m.get("tasks") is None else tuple(str(t) for t in m["tasks"])))
    _check_keys("train.", raw.get("train", {}), _TRAIN, str(p))
    _check_keys("eval.", raw.get("eval", {}), _EVAL, str(p))
    cfg = GridConfig(
        model=raw["model"], tasks=list(raw["tasks"]), methods=methods, seeds=list(raw.get("seeds", [0])),
        restore_bits=sorted(int(b) for b in raw.get("restore_bits", [16])), train=dict(raw.get("train", {})),
        eval=dict(raw.get("eval", {})), data_dir=raw.get("data_dir"),
    )
    for unit in plan_units(cfg):  # every unit's settings checked now, not when its turn comes
        _unit_settings(unit, cfg, where=f"{p}: {unit.id}: ")
        _scoring(_eval_settings(unit, cfg), where=f"{p}: {unit.id}: ")
        _grid_eval(_eval_settings(unit, cfg), where=f"{p}: {unit.id}: ")
    return cfg


@dataclass(frozen=True)
class Unit:
    """One training run and the restore levels it is evaluated at."""

    task: str
    method: Method
    train_bits: int
    seed: int
    restore_levels: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"{Path(self.task).stem}-{self.method.name}-{self.train_bits}b-s{self.seed}"


def plan_units(cfg: GridConfig) -> list[Unit]:
    """Every unit, in the config's method order (its priority): per method, its seeds, bits, then tasks.

    The task order turns around from one (method, seed, bits) to the next, so that `--shard i/2` deals each
    shard every task in turn rather than one task each."""
    units = []
    turn = 0
    for method in cfg.methods:
        for seed in method.seeds if method.seeds is not None else cfg.seeds:
            for k in method.bits:
                levels = (k,) + tuple(level for level in cfg.restore_bits if level > k)
                tasks = list(method.tasks if method.tasks is not None else cfg.tasks)
                for task in tasks if turn % 2 == 0 else tasks[::-1]:
                    units.append(Unit(task, method, k, seed, levels))
                turn += len(tasks) % 2 == 0
    return units


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'i/n' (0-based i), else SLURM_ARRAY_TASK_ID/COUNT or PBS_ARRAY_INDEX (+ RESTORA_SHARDS), else 0/1."""
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}") from None
    elif "SLURM_ARRAY_TASK_ID" in os.environ:
        i = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        n = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    elif "PBS_ARRAY_INDEX" in os.environ:
        i, n = int(os.environ["PBS_ARRAY_INDEX"]), int(os.environ.get("RESTORA_SHARDS", "1"))
    else:
        return 0, 1
    if not 0 <= i < n:
        raise ValueError(f"shard index {i} is outside 0..{n - 1}")
    return i, n


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _restore_format(unit: Unit, level: int, restore_format: str | None) -> str:
    if level == 16:
        return "float"
    if level == unit.train_bits:
        return "rtn" if unit.method.init == "loftq" and unit.method.format == "gptq" else unit.method.format
    fmt = restore_format or unit.method.format

    return fmt if level in SUPPORTED_BITS.get(fmt, ()) else ("int8" if level == 8 else "rtn")


def _eval_settings(unit: Unit, cfg: GridConfig) -> dict[str, Any]:
    """The config's [eval] settings with this unit's method overrides applied; a per-task table is resolved."""
    return _per_task({**cfg.eval, **dict(unit.method.eval)}, unit.task)


def _scoring(e: dict[str, Any], where: str = "") -> EvalSettings:
    """The shared scoring settings among a unit's resolved [eval] settings."""
    return settings_from(EvalSettings, {k: v for k, v in e.items() if k not in _GRID_EVAL}, where,
                         "evaluation setting")


def _grid_eval(e: dict[str, Any], where: str = "") -> GridEvalSettings:
    """The grid's own settings among a unit's resolved [eval] settings."""
    return settings_from(GridEvalSettings, {k: v for k, v in e.items() if k in _GRID_EVAL}, where,
                         "evaluation setting")


def _train_settings(unit: Unit, cfg: GridConfig) -> dict[str, Any]:
    """The config's [train] settings with this unit's method overrides applied; a per-task table is resolved."""
    return _per_task({**cfg.train, **dict(unit.method.train)}, unit.task)


def _unit_settings(unit: Unit, cfg: GridConfig, where: str = "") -> dict[str, Any]:
    """train_adapter's adapter kind and settings groups for this unit: the [train] table, the method's overrides,
    and the unit's format, bits, group size, init and seed."""
    flat = {**_train_settings(unit, cfg), "format": unit.method.format, "bits": unit.train_bits,
            "group_size": unit.method.group_size, "init": unit.method.init, "seed": unit.seed}
    adapter = flat.pop("adapter", "lora")
    if adapter not in ("lora", "ia3"):
        raise ValueError(f"{where}training setting 'adapter' must be lora or ia3, got {adapter!r}")
    return {"adapter": adapter, **group_settings(flat, where)}


def _per_task(settings: dict[str, Any], task: str) -> dict[str, Any]:
    """A setting given as a table of task names ({ sql = 1024, gsm8k = 512 }) takes the task's value."""
    task = Path(task).stem
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            if task not in v and "default" not in v:
                raise ValueError(f"setting {k!r} has no value for task {task!r}: expected a key {task} or default")
            v = v.get(task, v.get("default"))
        out[k] = v
    return out


def _train_unit(unit: Unit, cfg: GridConfig, out: Path) -> Path:
    folder = out / "adapters" / unit.id
    done = folder / "restora.json"
    if done.is_file() and "steps" in (json.loads(done.read_text()).get("metrics") or {}):
        return folder
    t0 = time.perf_counter()
    settings = _unit_settings(unit, cfg)
    resume = (folder / "checkpoint" / "trainer.json").is_file()
    train(cfg.model, out=str(folder), task=unit.task, adapter=settings.pop("adapter"), **settings, resume=resume,
          overwrite=not resume, data_dir=cfg.data_dir)
    _write_json(folder / "grid_train.json", {"train_seconds": time.perf_counter() - t0, "peak_rss_bytes": _peak_rss_bytes()})
    return folder


def _eval_cell(unit: Unit, level: int, adapter: Path, cfg: GridConfig, mode: str = "plain") -> dict[str, Any]:
    e = _eval_settings(unit, cfg)
    scoring, g = _scoring(e), _grid_eval(e)
    settings = _unit_settings(unit, cfg)  # the unit's training settings, read once per cell
    fmt = _restore_format(unit, level, g.restore_format)
    t0 = time.perf_counter()
    restoration = None
    if mode in ("plain", "trained"):
        loaded, info = restore_base(adapter, level, fmt, unit.method.group_size, base="source" if mode == "plain" else mode,
                                    calib_task=unit.task, seed=unit.seed, data_dir=cfg.data_dir,
                                    calib_samples=settings["base"].calib_samples)
    else:
        levels = tuple(lvl for lvl in unit.restore_levels if lvl > unit.train_bits) or (level,)
        rmode = RestorationMode(mode, auto_bits=levels if mode == "auto" else (level,),
                                min_gain=g.auto_min_gain)
        loaded, info, restoration = restore_with_mode(adapter, level, rmode, fmt if mode != "auto" else None,
                                                      data_dir=cfg.data_dir, seed=unit.seed)
        level = int(restoration["restore_bits"])
    rows = _test_rows(unit, cfg, g, scoring)
    chat = settings["data"].chat
    merged: dict[str, list[tuple[float, int]]] = {}
    if mode == "trained":  # merged into the dequantized k-bit base, stored in bf16: what such an export holds
        exact = _merged_state(loaded.model)
        merged = _merged_losses(loaded, exact, unit, rows, g, scoring.batch_size, chat)
        _load_rounded(loaded.model, exact, torch.bfloat16)
    elif scoring.materialize:  # evaluation speed: one bf16 dequantization per layer (see dequantize_model)
        dequantize_model(loaded.model, torch.bfloat16)
    res = evaluate_task(loaded.model, loaded.tokenizer, unit.task, rows, scoring.max_new_tokens, scoring.batch_size,
                        generate=scoring.generate, use_chat_template=chat, progress=False, compile=scoring.compile,
                        generate_limit=scoring.limit or None, speculate=scoring.speculate)
    if mode == "plain" and level == 16 and g.merge_dtypes:  # merged into W16 (the source weights)
        merged = _merged_losses(loaded, _merged_state(loaded.model), unit, rows, g, scoring.batch_size, chat)
    trained = json.loads((adapter / "restora.json").read_text())
    gt = adapter / "grid_train.json"
    train_info = json.loads(gt.read_text()) if gt.is_file() else {}
    return {
        "unit": unit.id, "task": unit.task, "method": unit.method.name, "init": unit.method.init,
        "train_format": unit.method.format, "train_bits": unit.train_bits, "train_overrides": dict(unit.method.train), "restore_bits": level,
        "restore_format": info.restore_spec.format, "restore_mode": mode, "seed": unit.seed,
        "scoring": asdict(scoring),
        "targets": settings["lora"].targets,
        "restoration": {k: v for k, v in (restoration or {}).items()},
        "metrics": res.get("metrics", {}), "test_log_loss": res["log_loss"], "n": res["n"],
        "merged_log_loss": {d: _mean_loss(r) for d, r in merged.items()},
        "merged_row_losses": {d: [[round(x, 5), n] for x, n in r] for d, r in merged.items()},
        "val_loss": (trained.get("metrics") or {}).get("best_val_loss"),
        "best_epoch": (trained.get("metrics") or {}).get("best_epoch"),
        "train_steps": (trained.get("metrics") or {}).get("steps"),
        "train_seconds": train_info.get("train_seconds"), "eval_seconds": time.perf_counter() - t0,
        "peak_rss_bytes": _peak_rss_bytes(), "examples": res.get("examples", [])[:2],
        "compiled_decoding": res["compiled_decoding"],
        "row_losses": [[round(x, 5), n] for x, n in res["row_losses"]],
        "row_scores": res.get("row_scores", []),
    }


def _test_rows(unit: Unit, cfg: GridConfig, g: GridEvalSettings, scoring: EvalSettings) -> list[dict[str, Any]]:
    """The held-out rows: log loss over the first `loss_limit` (default `limit`), generation over the first `limit`
    (either 0: all rows)."""
    limit = scoring.limit or None
    n = (limit if g.loss_limit is None else g.loss_limit) or None
    if n is not None and limit is not None:
        n = max(int(n), limit)
    return task_split(unit.task, scoring.split, unit.seed, cfg.data_dir, limit=n)


def _merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter folded into its base in float32 (W + s·BA formed once), as a state dict; the model is left
    as a plain float32 model."""
    model.to(torch.float32)
    dequantize_model(model, torch.float32)
    merge_and_unload(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load_rounded(model: torch.nn.Module, exact: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """The float32 merged weights `exact`, rounded once to `dtype` (the model goes to float32 first, so loading
    does not round them through the dtype it held before)."""
    model.to(torch.float32)
    model.load_state_dict(exact)
    model.to(dtype)


def _mean_loss(per_row: list[tuple[float, int]]) -> float:
    return sum(x for x, _ in per_row) / max(sum(n for _, n in per_row), 1)


def _merged_losses(loaded: Any, exact: dict[str, torch.Tensor], unit: Unit, rows: list[dict[str, Any]],
                   g: GridEvalSettings, batch_size: int, chat: bool) -> dict[str, list[tuple[float, int]]]:
    """Per-row test losses, on the first `merge_limit` rows, of the merged weights `exact` stored in each of
    `merge_dtypes` (rounded once, as `export --to merged-hf` writes them) and computed in float32: the effect
    measured is the storage's rounding of W + s·BA alone. (float32 compute: this CPU's float16 matmul is 25 times
    slower than its bfloat16 one, and a float16 compute would add its own rounding.)"""
    limit = g.merge_limit
    encoded = encode_rows(get_task(unit.task), loaded.tokenizer, rows[:limit] if limit else rows, 512, chat)
    out = {}
    for name in g.merge_dtypes:
        _load_rounded(loaded.model, exact, _MERGE_DTYPES[name])
        loaded.model.to(torch.float32)
        out[name] = row_losses(loaded.model, encoded, loaded.tokenizer.pad_token_id, batch_size,
                               bf16=False)
    return out


def run_grid(cfg: GridConfig, out: str | Path, shard: tuple[int, int] = (0, 1), progress: bool = True) -> list[Path]:
    """Run this shard's units (training once, then every restore level); return the cell files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    i, n = shard
    units = [u for j, u in enumerate(plan_units(cfg)) if j % n == i]
    written = []
    for u_idx, unit in enumerate(units):
        g = _grid_eval(_eval_settings(unit, cfg))
        wanted = _cells(unit, list(g.restore_modes), g.mode_bits)
        pending = [(lvl, mode, cid) for lvl, mode, cid in wanted if not (out / "cells" / f"{cid}.json").is_file()]
        if progress:
            print(f"[grid {i}/{n}] unit {u_idx + 1}/{len(units)} {unit.id}: {len(pending)} cells to evaluate", flush=True)
        if pending:
            adapter = _train_unit(unit, cfg, out)
            for level, mode, cid in pending:
                cell = _eval_cell(unit, level, adapter, cfg, mode)
                _write_json(out / "cells" / f"{cid}.json", cell)
                if progress:
                    m = ", ".join(f"{k} {100 * v['value']:.1f}" for k, v in cell["metrics"].items())
                    print(f"  restore {cell['restore_bits']:>2} bits ({mode}): log loss {cell['test_log_loss']:.4f} {m}",
                          flush=True)
        written += [out / "cells" / f"{cid}.json" for _, _, cid in wanted]
    return written


def _cells(unit: Unit, modes: list[str], mode_bits: tuple[int, ...] | None = None) -> list[tuple[int, str, str]]:
    """(restore level, mode, cell id): the own base once, the dequantized own base ("trained") once, each higher
    level per mode (modes other than plain only at `mode_bits`, when given), auto once."""
    out = [(unit.train_bits, "plain", f"{unit.id}-l{unit.train_bits}")]
    if "trained" in modes and unit.train_bits < 16:
        out.append((unit.train_bits, "trained", f"{unit.id}-l{unit.train_bits}-trained"))
    for level in unit.restore_levels[1:]:
        for mode in modes:
            if mode == "loftq" and unit.method.init != "loftq":
                continue  # the loftq mode swaps LoftQ's init fit: only LoftQ units have one
            if mode != "plain" and mode_bits is not None and level not in mode_bits:
                continue
            if mode not in ("auto", "trained"):
                out.append((level, mode, f"{unit.id}-l{level}" + ("" if mode == "plain" else f"-{mode}")))
    if "auto" in modes and len(unit.restore_levels) > 1:
        out.append((unit.restore_levels[-1], "auto", f"{unit.id}-auto"))
    return out


def collect(out: str | Path) -> list[dict[str, Any]]:
    """Merge all cell files under OUT/cells into results.json, results.csv, table.md and plr.png, and (for cells
    with per-row numbers) study.md and its plots (restora.experiments.study)."""

    out = Path(out)
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    if not cells:
        raise ValueError(f"{out}/cells holds no results yet: run the grid first")
    write_reports(cells, out)
    write_study(cells, out)
    return cells
