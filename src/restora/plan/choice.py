"""Choosing a memory plan: one candidate per precision, the most precise that fits, and `restora plan`.

restora.plan.memory itemises the memory of one setting. Here the settings are laid out: a
ladder of (format, bits), most precise first (float, int8, nf4, rtn 4/3/2 by default);
`choose_plan` takes the first that fits a budget (the PLR choice of restore level l when
serving), and for training `best_train_setting` shrinks the micro-batch, then turns on
checkpointing, before giving up on a precision k.
"""

from __future__ import annotations

from typing import Any

import torch

from restora.core.runtime import available_memory
from restora.kernels.compiled import auto_compiles
from restora.plan.memory import (
    SERVE_LADDER,
    MemoryPlan,
    ModelShape,
    format_bytes,
    plan_memory,
)

__all__ = ["COMPILED_DEQUANT_MAX", "compile_for_training", "auto_micro_batch", "budget_or_available", "ladder", "serve_candidates", "train_candidates", "choose_plan", "best_train_setting", "compiles",
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


def _compiled(config: Any, format: str, kw: dict[str, Any]) -> dict[str, Any]:
    """kw with `compile_mode` (auto/on/off) turned into this base's `compiled` decision."""
    if "compile_mode" not in kw:
        return kw
    kw = dict(kw)
    mode = kw.pop("compile_mode")
    return {**kw, "compiled": compiles(mode, config, format)}


def train_candidates(config: Any, format: str | None = None, **kw: Any) -> list[MemoryPlan]:
    """One train plan per base precision k, most precise first (float = 16-bit LoRA)."""
    return [plan_memory(config, "train", format=f, bits=b, **_compiled(config, f, kw)) for f, b in ladder(format)]


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
        p = plan_memory(config, "train", format=format, bits=bits, batch_size=b, grad_checkpointing=c,
                        **_compiled(config, format, kw))
        if p.total <= budget:
            return p
    return None


def auto_micro_batch(config: Any, budget: int, batch_size: int, format: str, bits: int, **kw: Any) -> MemoryPlan:
    """The train plan with the largest micro-batch that divides `batch_size` and fits `budget` (PLR's proposal:
    spend what quantization saves on bigger batches); a one-line error if not even one row fits."""
    divisors = [b for b in range(batch_size, 0, -1) if batch_size % b == 0]
    for b in divisors:
        p = plan_memory(config, "train", format=format, bits=bits, batch_size=b, **_compiled(config, format, kw))
        if p.total <= budget:
            return p
    raise ValueError(f"budget {format_bytes(budget)} is too small to train on this base with micro-batch 1: the plan "
                     f"needs {format_bytes(p.total)} (try --grad-checkpointing, a lower --bits or a shorter --max-len)")


def budget_or_available(budget: int | None) -> int:
    """`budget`, else the memory available now; a one-line error where neither is known."""
    if budget is not None:
        return budget
    free = available_memory()
    if free is None:
        raise ValueError("cannot read the available memory here: pass --memory-budget (e.g. 16GiB)")
    return free


# Compiled blocks keep each quantized layer's dequantized bf16 weight for the backward (2 bytes a weight), where
# eager training keeps only the codes: 14 GiB for an 8B model. `compile auto` compiles a quantized base only
# while that copy stays under this (models up to about 1B parameters); `--compile on` compiles regardless.
COMPILED_DEQUANT_MAX = 2 * 2**30


def compiles(mode: str, config: Any, format: str = "float") -> bool:
    """restora train's compile decision (`compile_for_training`), from the config alone (no weights)."""
    if mode != "auto":
        return mode == "on"
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    return compile_for_training(mode, shape.linear_params() + shape.vocab * shape.hidden, torch.device("cpu"),
                                shape.linear_params(), format)


def compile_for_training(mode: str, n_params: int, device: torch.device, linear_params: int, format: str,
                         sharded: bool = False) -> bool:
    """Compile the decoder blocks while training? "on"/"off" as asked; "auto": models of 50M+ parameters on a
    device inductor supports, not under FSDP sharding, and for a quantized base only while the dequantized weights
    compiled blocks keep stay under COMPILED_DEQUANT_MAX."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if sharded or (format != "float" and 2 * linear_params > COMPILED_DEQUANT_MAX):
        return False
    return auto_compiles(n_params, device)
