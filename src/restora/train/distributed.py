"""Data parallelism for adapter training on PyTorch's own engine (torch.distributed).

Under `torchrun --nproc-per-node N` (or multi-node torchrun) every rank holds the same
frozen base and the same adapter. Each optimizer step's global batch of `batch_size`
rows is split deterministically: rank r takes rows r, r+N, r+2N, ... of it. Every rank
scales its summed loss by the label count of the *global* batch, so after summing the
adapter gradients over ranks (one all-reduce of one flat buffer: the base has no
gradients, so nothing else crosses the wire) each rank holds exactly the single-process
gradient, and identical optimizer steps keep the adapters identical. Backend: gloo on
CPU, NCCL on CUDA. Rank 0 alone writes checkpoints, logs and adapter folders.

`parallel="fsdp"` keeps the same data split and loss scaling but shards the frozen base
and the adapter with FSDP2 instead of replicating them (see restora.train.fsdp).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "all_reduce_grads", "all_reduce_sum", "barrier", "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run; `parallel` is ddp (replicate) or fsdp (shard, restora.train.fsdp)."""

    rank: int = 0
    world_size: int = 1
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def fsdp(self) -> bool:
        """Sharded training: FSDP2 over more than one rank."""
        return self.enabled and self.parallel == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: Sequence) -> list:
        """This rank's deterministic share of a global batch."""
        return list(rows[self.rank :: self.world_size])


def init_distributed(parallel: str = "ddp") -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(parallel=parallel)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(dist.get_rank(), dist.get_world_size(), parallel)


def all_reduce_grads(params: Sequence[nn.Parameter], info: DistInfo) -> None:
    """Sum the adapter gradients over ranks, as one flat buffer."""
    if not info.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (total adapter params,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device_for(info))  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def device_for(info: DistInfo) -> torch.device:
    """Where this process trains: its local GPU (LOCAL_RANK under torchrun) when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if info.enabled else torch.cuda.current_device())
    return torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
