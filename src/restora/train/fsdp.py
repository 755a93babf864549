"""Fully sharded adapter training: FSDP2 shards the frozen base and the adapter over ranks.

FSDP (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel",
arXiv:2304.11277) keeps 1/N of every parameter on each of N ranks and all-gathers one
decoder block's parameters just before that block computes, freeing them after. Here it
runs on PyTorch's own `fully_shard` (FSDP2): one group per decoder block, then the root,
which holds what is left (embeddings, final norm, LM head; tied weights stay one tensor).

The root is `ShardedLoss`, a module whose forward is the whole completion loss, because
restora's loss calls the decoder and the LM head separately and FSDP's root hooks must run
around both. Gradients are reduce-scattered as a plain sum (divide factor 1): each rank
already scales its loss by the global batch's label count (see restora.train.distributed), so
the summed shards are exactly the single-process gradient, as with DDP. AdamW then steps
on each rank's 1/N of the adapter and of its moments.

Quantized bases. FSDP2 shards parameters, never buffers, and a QuantizedWeight keeps its
packed codes and scales as buffers. `shard_for_training` re-registers every persistent
buffer of at least one dimension of a quantized layer as a frozen parameter
(requires_grad=False; state-dict keys are unchanged), so codes, scales, zeros, absmax,
g_idx and biases are sharded like any weight; only 0-dim constants (the double-quant
offset, 4 bytes a layer) and the non-persistent 16-entry NF4/FP4 table stay replicated.
Supported: float, nf4, fp4 (double quant too), int8, rtn and gptq (act-order too). Any
other format is refused rather than silently replicated.

Files. Parameters and AdamW moments are DTensors; `full_tensor` gathers one (a collective:
every rank calls it, in the same order) and `shard_as` cuts a full tensor back into this
rank's piece, so checkpoints and adapter folders have exactly the non-sharded format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from restora.train.distributed import DistInfo
from restora.quant.base import QuantizedWeight
from restora.quant.linear import QuantLinear
from restora.core.modules import decoder_blocks

__all__ = [
    "FSDP_FORMATS",
    "ShardedLoss",
    "check_fsdp_formats",
    "full_tensor",
    "gathered_adapter",
    "set_gradient_sync",
    "shard_as",
    "shard_for_training",
]

FSDP_FORMATS = ("float", "nf4", "fp4", "int8", "rtn", "gptq")


class ShardedLoss(nn.Module):
    """The FSDP root: `loss_fn(model, *args)` run as one module's forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.loss_fn(self.model, *args)


def check_fsdp_formats(model: nn.Module) -> None:
    """One-line error if some quantized layer has a format FSDP would not shard."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.qweight.format not in FSDP_FORMATS:
            raise ValueError(
                f"--parallel fsdp cannot shard {name}: format {module.qweight.format!r} would stay replicated;"
                f" FSDP supports {', '.join(FSDP_FORMATS)}"
            )


def _promote_buffers(model: nn.Module) -> None:
    """Quantized layers' persistent buffers (codes, scales, ...) become frozen parameters FSDP can shard."""
    for module in model.modules():
        if not isinstance(module, (QuantLinear, QuantizedWeight)):
            continue
        for name, buf in list(module._buffers.items()):
            if buf is None or name in module._non_persistent_buffers_set or buf.dim() == 0:
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(buf, requires_grad=False))
        if hasattr(module, "FAST_ROWS"):
            module.FAST_ROWS = 0  # the fused decode kernel would cache an unsharded copy of the codes


def shard_for_training(model: nn.Module, loss_fn: Callable[..., Any], info: DistInfo) -> ShardedLoss:
    """Shard `model` (base and adapter) over the ranks; returns the root to call as `root(*loss args)`.

    Call after the adapter is added and before the optimizer is built (it must see the
    sharded parameters).
    """
    check_fsdp_formats(model)
    _promote_buffers(model)
    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (info.world_size,))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)  # gathered just before the block runs, freed after
    root = ShardedLoss(model, loss_fn)
    fully_shard(root, mesh=mesh)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum over ranks: losses are already / global labels
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no AVG / PREMUL_SUM)
    return root


def set_gradient_sync(root: ShardedLoss, enabled: bool) -> None:
    """Reduce-scatter gradients after the next backward (last micro-batch) or keep accumulating."""
    if isinstance(root, FSDPModule):
        root.set_requires_gradient_sync(enabled)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded DTensor; every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_as(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut like the (possibly sharded) `like`; every rank holds `full`, so nothing is sent."""
    if isinstance(like, DTensor) and full.shape == like.shape:
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return full


@contextmanager
def gathered_adapter(model: nn.Module) -> Iterator[None]:
    """Within the block the trainable parameters are whole tensors (enter on every rank).

    For writing the adapter folder with the ordinary, non-sharded code; no forward or
    optimizer step may run inside.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if isinstance(p, DTensor) and p.requires_grad:
                        whole = nn.Parameter(p.full_tensor(), requires_grad=False)
                        swapped.append((module, name, p))
                        module._parameters[name] = whole
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
