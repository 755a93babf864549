"""Resumable training state: the checkpoint folder, the checks before resuming, and the run's output folder.

Every `save_every` optimizer steps the adapter, the optimizer moments, the RNG state (dropout) and the trainer
position are written to OUT/checkpoint (safetensors + JSON, all or nothing: restora.core.atomic), so a killed run
resumes losing at most the optimizer step in flight. The checkpoint also records the run's model, base, adapter and
data settings (`run`); resuming with any of them, or any TrainConfig.resume_key setting, changed is refused.
Files always hold whole tensors: under FSDP `whole` gathers a shard and `piece` cuts a whole tensor back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from restora.core.atomic import atomic_dir, recover, write_text_atomic
from restora.core.jsonfile import read_json_object
from restora.train.config import TrainConfig
from restora.train.distributed import DistInfo

__all__ = ["RUN_FILES", "RUN_SETTINGS", "Piece", "Whole", "as_is", "check_resume", "load_checkpoint", "prepare_out",
           "rows_hash", "save_checkpoint", "truncate_metrics", "whole_as_is"]

Whole = Callable[[torch.Tensor], torch.Tensor]  # whole(t): the whole tensor of a (possibly sharded) one
Piece = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # piece(full, like): `full` cut like `like`

# A run's settings besides TrainConfig that --resume must find unchanged (train_adapter's parameters), with the
# task's name and rows_hash of its rows.
RUN_SETTINGS = ("model", "format", "bits", "group_size", "adapter", "rank", "alpha", "dropout", "rslora", "targets",
                "init", "loftq_iters", "max_len", "max_samples", "val_samples", "chat", "calib_samples")

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "restora.json", "loftq_init.safetensors")


def rows_hash(rows: Any) -> str:
    """A short sha256 of JSON-able rows (the task's splits): resuming on other data is refused."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def as_is(t: torch.Tensor) -> torch.Tensor:
    """A `whole` for unsharded tensors: the tensor itself."""
    return t


def whole_as_is(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A `piece` for unsharded parameters: the whole tensor itself."""
    return full


def _checkpoint_tensors(
    named: dict[str, nn.Parameter], opt: torch.optim.Optimizer, whole: Whole
) -> dict[str, torch.Tensor]:
    """Adapter, optimizer moments and RNG state; `whole` gathers sharded tensors (FSDP: on every rank)."""
    tensors = {f"param/{k}": whole(p.detach()).contiguous() for k, p in named.items()}
    index = {id(p): k for k, p in named.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            for sk, sv in opt.state.get(p, {}).items():
                if torch.is_tensor(sv):
                    tensors[f"opt/{index[id(p)]}/{sk}"] = whole(sv.detach()).contiguous()
    tensors["rng/torch"] = torch.get_rng_state()  # dropout masks continue as if never stopped
    return tensors


def save_checkpoint(
    folder: Path,
    named: dict[str, nn.Parameter],
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    info: DistInfo,
    whole: Whole = as_is,
) -> None:
    """Write adapter, moments, RNG and the trainer `state` to `folder`: under FSDP every rank gathers, rank 0 writes."""
    if not (info.is_main or info.fsdp):
        return
    tensors = _checkpoint_tensors(named, opt, whole)
    if info.is_main:
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps(state, indent=2))


def _read_trainer_state(folder: Path) -> dict[str, Any]:
    path = recover(folder) / "trainer.json"
    state = read_json_object(path, " is missing: nothing to resume")
    for key in ("step", "config", "history"):
        if key not in state:
            raise ValueError(f"{path}: field {key!r} is missing: expected a trainer state written by restora train")
    return state


def check_resume(folder: str | Path, cfg: TrainConfig, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's trainer state, if `cfg` and `run` (model, base, adapter and data settings) match what it
    recorded; else a one-line error naming the first setting that differs and both values."""
    folder = Path(folder)
    state = _read_trainer_state(folder)
    mine = json.loads(json.dumps(run or {}, default=str))  # as the checkpoint holds it (lists, not tuples)
    differ = [(k, v, cfg.resume_key().get(k)) for k, v in state["config"].items() if cfg.resume_key().get(k) != v]
    differ += [(k, v, mine[k]) for k, v in (state.get("run") or {}).items() if k in mine and mine[k] != v]
    if differ:
        k, v, now = differ[0]
        raise ValueError(f"cannot resume from {folder}: setting {k} was {v!r}, now {now!r} "
                         "(same settings to resume, or --overwrite to start over)")
    return state


def load_checkpoint(
    folder: Path,
    named: dict[str, nn.Parameter],
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    piece: Piece = whole_as_is,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore adapter, moments and RNG; `piece(full, like)` cuts a whole tensor like a sharded one (FSDP)."""
    state = check_resume(folder, cfg, run)
    folder = recover(folder)
    try:
        tensors = load_file(str(folder / "state.safetensors"))
    except (SafetensorError, FileNotFoundError) as e:
        raise ValueError(f"cannot resume from {folder / 'state.safetensors'}: {str(e).splitlines()[0]}") from None
    with torch.no_grad():
        for k, p in named.items():
            key = f"param/{k}"
            if key not in tensors:
                raise ValueError(f"cannot resume from {folder}: adapter tensor {k} is missing")
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise ValueError(f"cannot resume from {folder}: adapter tensor {k} has shape "
                                 f"{tuple(tensors[key].shape)} there, the adapter now has {tuple(p.shape)}")
            p.copy_(piece(tensors[key], p))
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    for k, p in named.items():
        st = {sk.split("/")[-1]: v for sk, v in tensors.items() if sk.startswith(f"opt/{k}/")}
        if st:
            opt.state[p] = {sk: piece(v, p).clone() for sk, v in st.items()}
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past the checkpoint's step (written before a kill): a resumed run logs each step once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            pass  # a line cut off by the kill
    write_text_atomic(path, "".join(f"{line}\n" for line in keep))


def prepare_out(out: str | Path, resume: bool, overwrite: bool, cfg: TrainConfig, run: dict[str, Any] | None,
                clear: bool = True) -> None:
    """Check OUT before any work: a folder holding a run needs --resume (with the same settings) or --overwrite;
    with --overwrite (and `clear`: the writing rank) the old run's files are removed."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in OUT, or start over")
    if resume:
        check_resume(out / "checkpoint", cfg, run)
        return
    metrics = out / "metrics.jsonl"
    held = [n for n in ("checkpoint", *RUN_FILES[:3]) if (out / n).exists()]
    held += ["metrics.jsonl"] if metrics.is_file() and metrics.stat().st_size else []
    if not held:
        return
    if not overwrite:
        raise ValueError(f"{out} already holds a training run ({', '.join(held)}): pass --resume to continue it "
                         "or --overwrite to start over")
    if clear:
        for name in ("adapter_config.json", *RUN_FILES[1:], "metrics.jsonl"):  # the config first: readers start there
            (out / name).unlink(missing_ok=True)
        if (out / "checkpoint").exists():
            shutil.rmtree(out / "checkpoint")
