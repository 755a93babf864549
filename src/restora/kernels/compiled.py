"""Compile each decoder block for training (torch.compile, inductor).

Training a LoRA adapter on a small model on CPU is dominated by everything but the
matmuls: RMSNorm upcasts, autocast casts of the same input for q, k and v, SiLU·gate,
softmax, and (on a quantized base) dequantizing every weight. Inductor fuses these
element-wise chains into single C++ loops and leaves the matmuls to oneDNN/MKL, so the
tensors between them are written once instead of five times. A 4-bit base's dequantization
is one extern kernel where restora.kernels.dequant4 runs (AVX-512), which the graph calls once
per layer and micro-batch, keeping its output for the backward.

Every decoder block of a model runs the same code, so dynamo traces one block and reuses
the graph for all of them (parameters are graph inputs); `dynamic=True` keeps one graph
across micro-batch lengths. The first micro-batch pays the compile (about 40 s for
SmolLM2-135M on one core, a few seconds once inductor's on-disk cache is warm).

`compiled_blocks` compiles the blocks for the duration of a `with` and restores the eager
blocks afterwards, so generation (whose KV cache makes every layer a new graph) and any
later use of the model stay eager.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from restora.core.modules import decoder_blocks

__all__ = ["CompileMode", "auto_compiles", "can_compile", "compiled_blocks", "resolve_compile", "room_for_variants",
           "AUTO_MIN_PARAMS"]

CompileMode = Literal["auto", "on", "off"]
# "auto" compiles models at least this large: below it (unit-test models) the compile costs more than it saves.
AUTO_MIN_PARAMS = 50_000_000


def can_compile(device: torch.device) -> bool:
    """Inductor can build kernels for `device` here (on CPU: a C++ compiler is installed)."""
    if device.type == "cpu":  # inductor's CPU backend builds C++ with the system compiler
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    if device.type == "cuda":  # inductor's GPU backend generates triton kernels
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return False


def resolve_compile(mode: CompileMode, model: nn.Module, sharded: bool = False) -> bool:
    """Whether to compile: "on"/"off" as asked; "auto" for large-enough models on a device inductor
    supports, and not under FSDP sharding (`sharded`), which compiled blocks do not support."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if sharded:
        return False
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return auto_compiles(n, next(model.parameters()).device)


def auto_compiles(n_params: int, device: torch.device) -> bool:
    """compile "auto" for a model of `n_params` on `device`: large enough, and inductor can build there."""
    return n_params >= AUTO_MIN_PARAMS and can_compile(device)


# Graphs dynamo may keep per compiled function (its default is 8). One training run makes about
# three per block forward (first block's input without grad, the others with grad, no-grad
# validation), a decoding run up to four (batch 1 or more, 1 or more tokens a step), and every
# model in a process shares the count: a grid trains several bases in one process, and its later
# units went past 8 and trained partly eagerly, so their adapters were not the ones a standalone
# `restora train` makes (the demo's 3-bit unit: validation loss 0.61866 in the grid, 0.62374 alone
# and, with this limit, in the grid).
RECOMPILE_LIMIT = 64


# Inductor's CPU code generator warns once per fused node that mixes bf16 and fp16 (a 4-bit format's fp16 scales
# in a bf16 graph). The generated code is correct and a user can do nothing about it, so it is not shown.
QUIET = "bf16 and fp16 are mixed in the scheduler node"


@contextmanager
def room_for_variants(enabled: bool = True) -> Iterator[None]:
    """For the `with`: dynamo keeps compiling new variants up to RECOMPILE_LIMIT instead of running eagerly, and
    inductor's mixed-precision notice (QUIET) stays quiet."""
    if not enabled:
        yield
        return
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    with torch._dynamo.config.patch(recompile_limit=limit), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET)
        yield


@contextmanager
def compiled_blocks(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Compile every decoder block in place for the `with` body; yields how many were compiled."""
    blocks = list(decoder_blocks(model)) if enabled else []
    for block in blocks:
        block.compile(dynamic=True)
    try:
        with room_for_variants(bool(blocks)):
            yield len(blocks)
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # back to the eager forward
