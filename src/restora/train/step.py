"""One optimizer step: the rows it takes, its learning rate, and the forward/backward over its micro-batches.

The effective batch is `batch_size` rows, split into micro-batches of `micro_batch_size` (gradient accumulation).
Epoch e visits rows in the permutation drawn from (seed, e), so a resumed run sees the same order. Under torchrun
each rank runs its share of the global batch and the adapter gradients are summed over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from restora.train.config import TrainConfig
from restora.train.distributed import DistInfo, all_reduce_grads, all_reduce_sum
from restora.train.fsdp import set_gradient_sync
from restora.train.loss import Example, LossFn, _collate
from restora.train.optim8bit import AdamW8bit

__all__ = ["batch_rows", "lr_at", "make_optimizer", "optimizer_step"]


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, over the adapter's parameters."""
    if cfg.optimizer == "adamw8bit":
        return AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "paged_adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError("optimizer paged_adamw8bit needs bitsandbytes (and CUDA): pip install bitsandbytes") from e
        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the fused (one kernel per step) AdamW: 4.6 against 22 ms per step for SmolLM2's all-linear r16 adapter on CPU;
    # plain tensors only (FSDP's DTensor parameters take the multi-tensor one)
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` of `total`: linear warmup, then constant or cosine decay."""
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "cosine":
        p = (step - warm) / max(1, total - warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr


def batch_rows(rows: Sequence[Example], cfg: TrainConfig, epoch: int, k: int) -> list[Example]:
    """The global batch of step `k` of epoch `epoch`: a slice of the epoch's seeded permutation of `rows`."""
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    perm = torch.randperm(len(rows), generator=g).tolist()
    return [rows[i] for i in perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]]


def optimizer_step(
    batch: list[Example],
    lr: float,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    loss_of: LossFn,
    cfg: TrainConfig,
    info: DistInfo,
    pad_id: int,
    device: torch.device,
) -> tuple[float, int]:
    """Accumulate the gradient of the global `batch` over micro-batches, sum it over ranks, clip, step at `lr`.

    Returns the batch's mean loss per label token and its input tokens, both over all ranks.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    n_labels = sum(sum(1 for y in r["labels"][1:] if y != -100) for r in batch)
    loss_sum, step_tokens = 0.0, 0
    batch.sort(key=lambda r: len(r["input_ids"]))  # similar lengths share a micro-batch: less padding
    local = info.shard(batch)  # this rank's rows of the global batch
    for a in range(0, len(local), cfg.micro_batch_size):
        ids, labels, mask = (t.to(device) for t in _collate(local[a : a + cfg.micro_batch_size], pad_id))
        if info.fsdp:  # reduce-scatter once, after the last micro-batch
            set_gradient_sync(loss_of, a + cfg.micro_batch_size >= len(local))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            s, _ = loss_of(ids, labels, mask)
        (s / max(n_labels, 1)).backward()
        loss_sum += float(s.detach())
        step_tokens += int(mask.sum())
    if not info.fsdp:
        all_reduce_grads(params, info)
    loss_sum, step_tokens = all_reduce_sum([loss_sum, float(step_tokens)], info)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum / max(n_labels, 1), int(step_tokens)
