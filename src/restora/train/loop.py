"""The training loop: completion-only supervised fine-tuning of adapters on a frozen (possibly quantized) base.

The PLR protocol (the PLR report): rank 16, lr 2e-4, effective batch 32, up to 10 epochs, keep the epoch with the
lowest validation loss. Only parameters with requires_grad (the adapter's) train; the base stays bit-identical.
The loss is restora.train.loss's, each optimizer step restora.train.step's, and the resumable checkpoint
restora.train.checkpoint's. Under torchrun the global batch is split over ranks (restora.train.distributed); with
`parallel="fsdp"` the base and adapter are sharded (restora.train.fsdp) and every file is written from gathered
whole tensors, so checkpoints and adapters look the same either way.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from restora.kernels.attention import training_attention
from restora.kernels.compiled import compiled_blocks
from restora.plan.choice import compile_for_training
from restora.plan.shape import ModelShape
from restora.quant.base import QuantizedWeight
from restora.train.checkpoint import (
    RUN_SETTINGS,
    Piece,
    Whole,
    as_is,
    check_resume,
    load_checkpoint,
    prepare_out,
    rows_hash,
    save_checkpoint,
    truncate_metrics,
    whole_as_is,
)
from restora.train.config import TrainConfig
from restora.train.distributed import DistInfo, barrier, init_distributed
from restora.train.fsdp import (
    full_tensor,
    gathered_adapter,
    shard_as,
    shard_for_training,
)
from restora.train.loss import (  # _collate and _set_attention: imported from here by the benchmarks and tests
    LOGIT_CHUNK,
    Example,
    LossFn,
    _attention,
    _collate,
    _set_attention,
    completion_loss,
    evaluate_loss,
)
from restora.train.step import batch_rows, lr_at, make_optimizer, optimizer_step

__all__ = ["Example", "LOGIT_CHUNK", "RUN_SETTINGS", "TrainConfig", "check_resume", "completion_loss",
           "evaluate_loss", "prepare_out", "rows_hash", "train", "_collate", "_set_attention"]

SaveBest = Callable[[Path, dict[str, Any]], None]  # save_best(folder, metrics): writes the adapter as it is now


@dataclass
class _Progress:
    """Where the run stands, as its checkpoint records it: optimizer steps taken, the best validation loss and every
    validated epoch's loss."""

    step: int = 0
    best: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)

    def trainer_state(self, cfg: TrainConfig, run: dict[str, Any] | None) -> dict[str, Any]:
        """The checkpoint's trainer.json: this progress, with the settings a resume must repeat."""
        return {"step": self.step, "best_val_loss": self.best, "history": self.history, "config": cfg.resume_key(),
                "run": run}

    def summary(self, epochs: int, tokens_seen: int, seconds: float) -> dict[str, Any]:
        """What train() returns: steps, best epoch and loss (the last epoch without validation), throughput."""
        best_epoch = min(self.history, key=lambda h: h["val_loss"])["epoch"] if self.history else epochs
        return {"steps": self.step, "epochs": epochs, "best_epoch": best_epoch,
                "best_val_loss": self.best if self.history else None, "history": self.history,
                "tokens_per_s": tokens_seen / max(seconds, 1e-9)}


def _resumed(out: Path, named: dict[str, nn.Parameter], opt: torch.optim.Optimizer, cfg: TrainConfig, piece: Piece,
             run: dict[str, Any] | None, info: DistInfo) -> _Progress:
    """The progress OUT/checkpoint records, its adapter, moments and RNG restored; metrics logged past it dropped."""
    state = load_checkpoint(out / "checkpoint", named, opt, cfg, piece, run)
    if info.is_main:
        truncate_metrics(out / "metrics.jsonl", state["step"])
    return _Progress(state["step"], state["best_val_loss"], state["history"])


def _wrap_for_ranks(
    model: nn.Module, cfg: TrainConfig, info: DistInfo
) -> tuple[LossFn, Whole, Piece]:
    """The batch loss, and how files see parameters (`whole`: gathered; `piece`: cut back): as they are, unless
    `info` asks for FSDP, which shards the model in place first."""
    if not info.fsdp:
        return partial(completion_loss, model), as_is, whole_as_is
    if cfg.batch_size % info.world_size:
        raise ValueError(f"--parallel fsdp: batch_size {cfg.batch_size} must be a multiple of the {info.world_size}"
                         " ranks (every rank runs as many forward passes)")
    if cfg.compile == "on":
        raise ValueError("--parallel fsdp: compiled blocks are not supported under sharding; use --compile off")
    if cfg.optimizer != "adamw":
        raise ValueError(f"--parallel fsdp: optimizer {cfg.optimizer!r} cannot step sharded parameters; use adamw")
    return shard_for_training(model, completion_loss, info), full_tensor, shard_as


def _prepare_model(model: nn.Module, cfg: TrainConfig) -> str | None:
    """Turn on gradient checkpointing if asked; return the attention implementation to train with (None: as is).

    Eager attention on CPU: measured faster than SDPA's CPU backward at SFT lengths; its (T, T) maps recomputed in
    the backward (restora.kernels.attention), unless whole blocks are recomputed anyway (grad_checkpointing).
    """
    eager = cfg.eager_attention and next(model.parameters()).device.type == "cpu"
    attention = training_attention(model, recompute=not cfg.grad_checkpointing) if eager else None
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return attention


def _compiles(model: nn.Module, cfg: TrainConfig, info: DistInfo) -> bool:
    """cfg.compile decided for this model (restora.plan.choice.compile_for_training: auto weighs its size, its
    device, whether its base is quantized and whether it is sharded)."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    n_params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    quantized = any(isinstance(m, QuantizedWeight) for m in model.modules())
    return compile_for_training(cfg.compile, n_params, next(model.parameters()).device,
                                ModelShape.from_config(model.config).linear_params(), "quantized" if quantized else "float",
                                sharded=info.fsdp)


def _save_adapter(model: nn.Module, info: DistInfo, save_best: SaveBest, out: Path, metrics: dict) -> None:
    """Rank 0 writes the adapter folder; under FSDP every rank first gathers the whole adapter."""
    if info.fsdp:
        with gathered_adapter(model):
            if info.is_main:
                save_best(out, metrics)
    elif info.is_main:
        save_best(out, metrics)


def _end_epoch(model: nn.Module, val_rows: Sequence[Example], pad_id: int, cfg: TrainConfig, info: DistInfo,
               loss_of: LossFn, save_best: SaveBest, out: Path, at: _Progress, epoch: int,
               record: dict[str, Any]) -> None:
    """Validate (the loss into `record` and the history) and save the adapter if it is the best so far; without
    validation rows every epoch's adapter is saved."""
    if not val_rows:
        _save_adapter(model, info, save_best, out, {"best_epoch": epoch + 1, "history": at.history})
        return
    val = evaluate_loss(model, val_rows, pad_id, cfg.micro_batch_size, cfg.bf16, info, loss_of)
    record["val_loss"] = val
    at.history.append({"epoch": epoch + 1, "step": at.step, "val_loss": val})
    if val < at.best:
        at.best = val
        _save_adapter(model, info, save_best, out, {"best_epoch": epoch + 1, "best_val_loss": val,
                                                    "history": at.history})


def _log(record: dict[str, Any], metrics_log: IO[str] | None) -> None:
    """One line of metrics.jsonl (rank 0 alone holds the file)."""
    if metrics_log is not None:
        metrics_log.write(json.dumps(record) + "\n")
        metrics_log.flush()


def train(
    model: nn.Module,
    train_rows: Sequence[Example],
    val_rows: Sequence[Example],
    cfg: TrainConfig,
    out_dir: str | Path,
    pad_id: int,
    save_best: SaveBest,
    resume: bool = False,
    progress: bool = True,
    dist_info: DistInfo | None = None,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the model's trainable (adapter) parameters; return the metrics summary.

    Under torchrun each rank trains on its share of every global batch and the adapter gradients are summed over
    ranks (see restora.train.distributed); rank 0 alone writes files. With `dist_info.parallel == "fsdp"` the model
    is sharded in place first (restora.train.fsdp).

    `save_best(folder, metrics)` writes the adapter as it is now to `folder` (a PEFT-style adapter folder); it is
    called whenever validation loss improves, at each epoch's end. `run` (JSON values: model, base, adapter and data
    settings) is recorded in the checkpoint and must match on resume, as `cfg` must.
    """
    if not train_rows:
        raise ValueError("the training set is empty after filtering")
    if cfg.micro_batch_size == "auto":
        raise ValueError("micro_batch_size auto is chosen by train_adapter (the planner reads the model's source)")
    info = dist_info or init_distributed()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: add an adapter first")
    compiled = _compiles(model, cfg, info)  # before FSDP wraps the model
    loss_of, whole, piece = _wrap_for_ranks(model, cfg, info)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    opt = make_optimizer(params, cfg)
    steps_per_epoch = max(1, len(train_rows) // cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    at = _resumed(out, named, opt, cfg, piece, run, info) if resume else _Progress()
    attention = _prepare_model(model, cfg)
    model.train()
    metrics_log = (out / "metrics.jsonl").open("a") if info.is_main else None
    bar = tqdm(total=total_steps, initial=at.step, desc="train", disable=not (progress and info.is_main))
    t_start, tokens_seen = time.perf_counter(), 0
    device = next(model.parameters()).device  # device-agnostic: batches follow the model (CPU here, CUDA for users)
    try:  # the attention is restored after the compile is undone
        with _attention(model, attention), compiled_blocks(model, compiled):
            while at.step < total_steps:
                epoch, k = divmod(at.step, steps_per_epoch)
                batch = batch_rows(train_rows, cfg, epoch, k)
                lr = lr_at(at.step, total_steps, cfg)
                loss, step_tokens = optimizer_step(batch, lr, opt, params, loss_of, cfg, info, pad_id, device)
                at.step += 1
                tokens_seen += step_tokens
                rate = tokens_seen / (time.perf_counter() - t_start)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                bar.update(1)
                record: dict[str, Any] = {"step": at.step, "epoch": epoch, "loss": loss, "lr": lr, "tokens_per_s": rate,
                                          "tokens": tokens_seen}  # input tokens (all ranks) since this process started
                if at.step % steps_per_epoch == 0 or at.step == total_steps:
                    _end_epoch(model, val_rows, pad_id, cfg, info, loss_of, save_best, out, at, epoch, record)
                _log(record, metrics_log)
                if cfg.save_every and (at.step % cfg.save_every == 0 or at.step == total_steps):
                    save_checkpoint(out / "checkpoint", named, opt, at.trainer_state(cfg, run), info, whole)
    finally:
        bar.close()
        if metrics_log is not None:
            metrics_log.close()
    barrier(info)
    return at.summary(epochs, tokens_seen, time.perf_counter() - t_start)
