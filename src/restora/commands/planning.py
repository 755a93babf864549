"""`restora plan`: memory for training at k bits or serving at l bits (PLR) within a budget, from the config alone."""

from __future__ import annotations

from typing import Any, Literal

from transformers import AutoConfig

from restora.models.bases import CALIB_MAX_LEN
from restora.models.load import resolve_source
from restora.plan.choice import (
    best_train_setting,
    choose_plan,
    ladder,
    serve_candidates,
    source_dtype,
    train_candidates,
)
from restora.plan.memory import MemoryPlan, format_bytes, parse_budget, plan_memory

__all__ = ["plan"]


def plan(
    model: str,
    budget: str = "8GiB",
    mode: Literal["train", "serve", "quantize", "restore"] = "serve",
    format: Literal["auto", "float", "nf4", "fp4", "int8", "rtn", "gptq"] = "auto",
    group_size: int = 64,
    float_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
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
    double_quant: bool = False,
    calib_samples: int = 500,
    from_cache: bool = False,
) -> int:
    """Plan memory for training at k bits or serving at l bits (PLR) within BUDGET, from the config alone.

    Args:
        model: hub id, local HF folder, .gguf file, or smollm2-135m (only config.json is read).
        budget: memory available, e.g. 8GiB, 512MiB, 4GB, or bytes.
        mode: serve (pick the highest restore bits l that fits), train (which k, rank, micro-batch fit) or
            quantize / restore (what `restora quantize` / `restora restore` hold: one plan per precision).
        format: restrict the candidates to one format family (auto: float, int8, nf4, rtn 4/3/2).
        group_size: quantization group size.
        float_dtype: storage of embeddings, norms, LM head and float bases; auto = as `restora` holds them: the
            checkpoint's dtype (config.json), and bf16 for training (`restora train --bf16`, its default).
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
        double_quant: nf4/fp4 with double quantization of the absmax constants.
        calib_samples: GPTQ calibration rows (quantize: at --seq-len tokens each; train and serve: 256 tokens).
        from_cache: the base is in restora's cache of quantized bases already (no quantization while loading).
    """
    limit = parse_budget(budget)
    config = AutoConfig.from_pretrained(str(resolve_source(model)))
    source = source_dtype(config)
    if float_dtype == "auto":
        float_dtype = "bf16" if mode == "train" else source
    calib_len = seq_len if mode == "quantize" else CALIB_MAX_LEN
    kw: dict[str, Any] = dict(group_size=group_size, float_dtype=float_dtype, source_dtype=source,
                              calib_tokens=calib_samples * calib_len, from_cache=from_cache, double_quant=double_quant)
    fmt = None if format == "auto" else format
    print(f"{model}: {mode}, budget {format_bytes(limit)}")
    if mode in ("quantize", "restore"):
        extra = dict(adapter=adapter, rank=rank, targets=targets) if mode == "restore" else {}
        plans = [plan_memory(config, mode, format=f, bits=b, **kw, **extra) for f, b in ladder(fmt)
                 if f != "float" or mode == "restore"]
        for p in plans:
            print(f"  {p.label:<60} {format_bytes(p.total):>10}  {'fits' if p.total <= limit else '-'}")
        chosen = choose_plan(plans, limit)
        print(f"\n{chosen.label}\n")
        print(chosen.table(limit))
        return 0
    kw.update(adapter=adapter, rank=rank, targets=targets, seq_len=seq_len)
    if mode == "serve":
        plans = serve_candidates(config, fmt, batch_size=batch_size, adapters=adapters, **kw)
        for p in plans:
            print(f"  {p.label:<60} {format_bytes(p.total):>10}  {'fits' if p.total <= limit else '-'}")
        paged = serve_candidates(config, fmt, batch_size=batch_size, adapters=adapters, offload=True, **kw)
        fits = [p for p in plans if p.total <= limit]
        fits_paged = [p for p in paged if p.total <= limit]
        print("  with offloading (decoder blocks paged in from the file, `--offload`):")
        for p in paged:
            print(f"  {p.label:<60} {format_bytes(p.total):>10}  {'fits' if p.total <= limit else '-'}")
        if fits_paged and (not fits or fits_paged[0].bits > fits[0].bits):
            print(f"\nwith offloading, l = {fits_paged[0].bits} fits ({fits_paged[0].label.split(' base')[0]}); "
                  f"without, {'l = ' + str(fits[0].bits) if fits else 'nothing'}")
        chosen = choose_plan(plans, limit)
        print(f"\nPLR choice: restore to {chosen.label.split(' base')[0]} (l = {chosen.bits})\n")
        print(chosen.table(limit))
        return 0
    kw.update(optimizer=optimizer, compile_mode=compile, dropout=dropout)
    asked = train_candidates(config, fmt, batch_size=batch_size, grad_checkpointing=grad_checkpointing, **kw)
    print(f"  {'base k':<14} {'as asked':>10}  {'fits with':<30} {'largest rank':>12}")
    best: list[MemoryPlan] = []
    for p in asked:
        opt = best_train_setting(config, p.format, p.bits, batch_size, grad_checkpointing, limit, **kw)
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
