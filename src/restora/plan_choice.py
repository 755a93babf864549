"""Choosing a memory plan: one candidate per precision, the most precise that fits, and `restora plan`.

restora.plan itemises the memory of one setting. Here the settings are laid out: a
ladder of (format, bits), most precise first (float, int8, nf4, rtn 4/3/2 by default);
`choose_plan` takes the first that fits a budget (the PLR choice of restore level l when
serving), and for training `_best_train_setting` shrinks the micro-batch, then turns on
checkpointing, before giving up on a precision k.
"""

from __future__ import annotations

from typing import Any, Literal

from .plan import SERVE_LADDER, MemoryPlan, format_bytes, parse_budget, plan_memory

__all__ = ["serve_candidates", "train_candidates", "choose_plan", "plan"]


def _ladder(format: str | None) -> list[tuple[str, int]]:
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


def serve_candidates(config: Any, format: str | None = None, **kw: Any) -> list[MemoryPlan]:
    """One serve plan per restore level l, most precise first."""
    return [plan_memory(config, "serve", format=f, bits=b, **kw) for f, b in _ladder(format)]


def train_candidates(config: Any, format: str | None = None, **kw: Any) -> list[MemoryPlan]:
    """One train plan per base precision k, most precise first (float = 16-bit LoRA)."""
    return [plan_memory(config, "train", format=f, bits=b, **kw) for f, b in _ladder(format)]


def choose_plan(plans: list[MemoryPlan], budget: int) -> MemoryPlan:
    """The first (most precise) plan within `budget`; else a one-line error naming the smallest plan."""
    for p in plans:
        if p.total <= budget:
            return p
    smallest = min(plans, key=lambda p: p.total)
    raise ValueError(f"budget {format_bytes(budget)} is too small for any {smallest.mode} plan: the smallest, "
                     f"{smallest.label}, needs {format_bytes(smallest.total)}")


def _best_train_setting(config: Any, format: str, bits: int, batch_size: int, grad_checkpointing: bool, budget: int,
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


def _compiles(mode: str, config: Any) -> bool:
    """restora.compiled.resolve_compile's decision, from the config alone (no weights)."""
    if mode != "auto":
        return mode == "on"
    import torch

    from .compiled import auto_compiles
    from .plan import ModelShape

    shape = ModelShape.from_config(config)
    return auto_compiles(shape.linear_params() + shape.vocab * shape.hidden, torch.device("cpu"))


def plan(
    model: str,
    budget: str = "8GiB",
    mode: Literal["train", "serve"] = "serve",
    format: Literal["auto", "float", "nf4", "fp4", "int8", "rtn", "gptq"] = "auto",
    group_size: int = 64,
    float_dtype: Literal["fp32", "bf16"] = "fp32",
    adapter: Literal["lora", "ia3"] = "lora",
    rank: int = 16,
    targets: str = "all",
    batch_size: int = 8,
    seq_len: int = 512,
    adapters: int = 1,
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw",
    grad_checkpointing: bool = False,
    compile: Literal["auto", "on", "off"] = "auto",
    dropout: float = 0.0,
) -> int:
    """Plan memory for training at k bits or serving at l bits (PLR) within BUDGET, from the config alone.

    Args:
        model: hub id, local HF folder, .gguf file, or smollm2-135m (only config.json is read).
        budget: memory available, e.g. 8GiB, 512MiB, 4GB, or bytes.
        mode: serve (pick the highest restore bits l that fits) or train (which k, rank, micro-batch fit).
        format: restrict the candidates to one format family (auto: float, int8, nf4, rtn 4/3/2).
        group_size: quantization group size.
        float_dtype: storage of embeddings, norms, LM head and float bases (restora loads fp32 on CPU;
            `restora train` with bf16 on, its default, holds them in bf16 for every base: plan it with bf16).
        adapter: lora or ia3.
        rank: LoRA rank r.
        targets: attn (q,k,v,o) or all (every linear layer of the blocks).
        batch_size: serve: concurrent sequences; train: micro-batch rows.
        seq_len: tokens per sequence (serve: prompt + generated, all of it prompt in the worst case).
        adapters: serve: adapters held at once.
        optimizer: train: adamw (fp32 moments) or adamw8bit.
        grad_checkpointing: train: recompute decoder activations in the backward pass.
        compile: train: plan compiled blocks (as `restora train --compile`); auto = on for models of 50M+
            parameters when a C++ compiler is installed, as restora train decides.
        dropout: train: LoRA dropout (restora train's default is 0; dropout keeps a noise mask per adapter input).
    """
    from transformers import AutoConfig

    from .models import resolve_source

    limit = parse_budget(budget)
    config = AutoConfig.from_pretrained(str(resolve_source(model)))
    kw: dict[str, Any] = dict(group_size=group_size, float_dtype=float_dtype, adapter=adapter, rank=rank,
                              targets=targets, seq_len=seq_len)
    fmt = None if format == "auto" else format
    print(f"{model}: {mode}, budget {format_bytes(limit)}")
    if mode == "serve":
        plans = serve_candidates(config, fmt, batch_size=batch_size, adapters=adapters, **kw)
        for p in plans:
            print(f"  {p.label:<60} {format_bytes(p.total):>10}  {'fits' if p.total <= limit else '-'}")
        chosen = choose_plan(plans, limit)
        print(f"\nPLR choice: restore to {chosen.label.split(' base')[0]} (l = {chosen.bits})\n")
        print(chosen.table(limit))
        return 0
    kw.update(optimizer=optimizer, compiled=_compiles(compile, config), dropout=dropout)
    asked = train_candidates(config, fmt, batch_size=batch_size, grad_checkpointing=grad_checkpointing, **kw)
    print(f"  {'base k':<14} {'as asked':>10}  {'fits with':<30} {'largest rank':>12}")
    best: list[MemoryPlan] = []
    for p in asked:
        opt = _best_train_setting(config, p.format, p.bits, batch_size, grad_checkpointing, limit, **kw)
        how, top_rank = "-", "-"
        if opt is not None:
            best.append(opt)
            s = opt.settings
            how = f"micro-batch {s['batch_size']}{', checkpointing' if s['grad_checkpointing'] else ''}"
            ranks = [r for r in (2**i for i in range(9)) if plan_memory(config, **{**s, "rank": r}).total <= limit]
            top_rank = str(max(ranks)) if ranks else "-"
        name = p.label.split(" base")[0]
        print(f"  {name:<14} {format_bytes(p.total):>10}  {how:<30} {top_rank:>12}")
    if not best:  # the smallest plan there is: 2-bit base, micro-batch 1, checkpointing
        choose_plan(train_candidates(config, fmt, batch_size=1, grad_checkpointing=True, **kw), limit)
    chosen = best[0]
    print(f"\ntraining base k = {chosen.bits}: {chosen.label}\n")
    print(chosen.table(limit))
    return 0
