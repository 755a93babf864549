"""Choosing a memory plan: one candidate per precision, the most precise that fits, and `restora plan`.

restora.plan.memory itemises the memory of one setting. Here the settings are laid out: a
ladder of (format, bits), most precise first (float, int8, nf4, rtn 4/3/2 by default);
`choose_plan` takes the first that fits a budget (the PLR choice of restore level l when
serving), and for training `best_train_setting` shrinks the micro-batch, then turns on
checkpointing, before giving up on a precision k.
"""

from __future__ import annotations

from typing import Any

from restora.kernels.compiled import auto_compiles
from restora.plan.memory import (
    SERVE_LADDER,
    MemoryPlan,
    ModelShape,
    format_bytes,
    plan_memory,
)

__all__ = ["auto_micro_batch", "available_memory", "ladder", "serve_candidates", "train_candidates", "choose_plan", "best_train_setting", "compiles",
           "source_dtype"]


def ladder(format: str | None) -> list[tuple[str, int]]:
    """Candidate (format, bits), most precise first; `format` restricts the quantized ones."""
    if format in (None, "auto"):
        return SERVE_LADDER
    if format in ("rtn", "gptq"):
        return [("float", 16)] + [(format, b) for b in (8, 4, 3, 2)]
    if format in ("nf4", "fp4"):
        return [("float", 16), (format, 4)]
    if format in ("int8", "float"):
        return [("float", 16)] + ([("int8", 8)] if format == "int8" else [])
    raise ValueError(f"format must be auto, float, nf4, fp4, int8, rtn or gptq, got {format!r}")


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def source_dtype(config: Any) -> str:
    """The dtype a checkpoint stores its weights in, from its config (fp32 when it does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return _DTYPE_NAMES.get(str(dtype).removeprefix("torch."), "fp32")


def serve_candidates(config: Any, format: str | None = None, **kw: Any) -> list[MemoryPlan]:
    """One serve plan per restore level l, most precise first."""
    return [plan_memory(config, "serve", format=f, bits=b, **kw) for f, b in ladder(format)]


def train_candidates(config: Any, format: str | None = None, **kw: Any) -> list[MemoryPlan]:
    """One train plan per base precision k, most precise first (float = 16-bit LoRA)."""
    return [plan_memory(config, "train", format=f, bits=b, **kw) for f, b in ladder(format)]


def choose_plan(plans: list[MemoryPlan], budget: int) -> MemoryPlan:
    """The first (most precise) plan within `budget`; else a one-line error naming the smallest plan."""
    for p in plans:
        if p.total <= budget:
            return p
    smallest = min(plans, key=lambda p: p.total)
    raise ValueError(f"budget {format_bytes(budget)} is too small for any {smallest.mode} plan: the smallest, "
                     f"{smallest.label}, needs {format_bytes(smallest.total)}")


def best_train_setting(config: Any, format: str, bits: int, batch_size: int, grad_checkpointing: bool, budget: int,
                        **kw: Any) -> MemoryPlan | None:
    """At base (format, bits): the requested setting if it fits, else the largest micro-batch
    (powers of two below the request) without checkpointing, else with it; None if nothing fits."""
    options = [(batch_size, grad_checkpointing)]
    smaller = [2**i for i in range(12) if 2**i < batch_size][::-1]
    options += [(b, c) for c in sorted({grad_checkpointing, True}) for b in smaller]
    for b, c in options:
        p = plan_memory(config, "train", format=format, bits=bits, batch_size=b, grad_checkpointing=c, **kw)
        if p.total <= budget:
            return p
    return None


def auto_micro_batch(config: Any, budget: int, batch_size: int, format: str, bits: int, **kw: Any) -> MemoryPlan:
    """The train plan with the largest micro-batch that divides `batch_size` and fits `budget` (PLR's proposal:
    spend what quantization saves on bigger batches); a one-line error if not even one row fits."""
    divisors = [b for b in range(batch_size, 0, -1) if batch_size % b == 0]
    for b in divisors:
        p = plan_memory(config, "train", format=format, bits=bits, batch_size=b, **kw)
        if p.total <= budget:
            return p
    raise ValueError(f"budget {format_bytes(budget)} is too small to train on this base with micro-batch 1: the plan "
                     f"needs {format_bytes(p.total)} (try --grad-checkpointing, a lower --bits or a shorter --max-len)")


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux): what a new process can use without swapping."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError("cannot read the available memory here: pass --memory-budget (e.g. 16GiB)")


def compiles(mode: str, config: Any) -> bool:
    """restora.kernels.compiled.resolve_compile's decision, from the config alone (no weights)."""
    if mode != "auto":
        return mode == "on"
    import torch


    shape = ModelShape.from_config(config)
    return auto_compiles(shape.linear_params() + shape.vocab * shape.hidden, torch.device("cpu"))
