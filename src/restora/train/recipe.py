"""The QLoRA training recipe: build the base at k bits, add the adapter, train it, keep the best epoch.

`train_adapter` is what `restora train` and the experiment grid run: it builds (or loads from cache) the
training base, holds its unquantized parts in bf16 as a bf16 base holds them, adds LoRA or (IA)³ (LoftQ
initialisation included), encodes the task's rows, runs restora.train.loop and writes a PEFT-compatible
adapter folder with restora.json provenance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig
from safetensors.torch import save_file

from restora.adapters import IA3Config, LoRAConfig, add_ia3, add_lora, save_adapter
from restora.core.mapped import to_dtype
from restora.core.runtime import release_freed_memory
from restora.data import encode_rows, get_task, split_rows
from restora.models.load import resolve_source
from restora.plan.choice import auto_micro_batch, budget_or_available, compile_for_training, compiles, source_dtype
from restora.plan.memory import ModelShape, format_bytes, parse_budget
from restora.models.bases import CALIB_MAX_LEN, base_choice, build_base, build_loftq_base
from restora.quant.base import QuantizedWeight
from restora.quant.model import cast_unquantized
from restora.train.distributed import barrier, device_for, init_distributed
from restora.train.loop import RUN_SETTINGS, TrainConfig, prepare_out, rows_hash
from restora.train.loop import train as run_train

__all__ = ["Base", "RELEASE_MIN_PARAMS", "train_adapter"]

# From here on a run is bound by memory: freed memory goes back to the OS (restora.core.runtime), and a quantized
# base keeps no kernel layout (the int4 kernel's second copy of the codes, built when validation runs without
# gradients: 3.9 GiB more at 8B), so the peak is the planner's.
RELEASE_MIN_PARAMS = 1_000_000_000

Base = Literal["float", "nf4", "fp4", "int8", "rtn", "gptq"]


def train_adapter(
    model: str,
    *,
    out: str,
    task: str = "sql",
    format: Base = "nf4",
    bits: int = 4,
    group_size: int = 64,
    adapter: Literal["lora", "ia3"] = "lora",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    rslora: bool = False,
    targets: str = "all",
    init: Literal["default", "gaussian", "loftq"] = "default",
    loftq_iters: int = 5,
    epochs: int = 1,
    max_steps: int = 0,
    lr: float = 2e-4,
    batch_size: int = 32,
    micro_batch_size: int | Literal["auto"] = 8,
    memory_budget: str | None = None,
    schedule: Literal["constant", "cosine"] = "constant",
    warmup_ratio: float = 0.0,
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw",
    bf16: bool = True,
    grad_checkpointing: bool = False,
    compile: Literal["auto", "on", "off"] = "auto",
    max_samples: int = 0,
    val_samples: int = 200,
    max_len: int = 384,
    chat: bool = False,
    seed: int = 0,
    calib_samples: int = 500,
    resume: bool = False,
    overwrite: bool = False,
    parallel: Literal["ddp", "fsdp"] = "ddp",
    data_dir: str | None = None,
) -> int:
    """Fine-tune an adapter on MODEL quantized to FORMAT/BITS (QLoRA), keeping the best-validation epoch.

    Args:
        model: hub id, local HF folder, .gguf file, or smollm2-135m (the float source model).
        out: adapter folder (PEFT-compatible, plus restora.json provenance, metrics.jsonl, checkpoint/).
        task: sql, gsm8k, or PATH.jsonl with prompt/completion fields.
        format: training base format (float = no quantization).
        bits: training base bits k.
        group_size: quantization group size.
        adapter: lora or ia3.
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with --rslora).
        dropout: LoRA dropout.
        rslora: use rsLoRA scaling alpha/sqrt(r).
        targets: attn (q,k,v,o), all (every linear layer incl. MLP), comma-separated names, or a regex.
        init: LoRA init: default (Kaiming A, B=0), gaussian, or loftq (quantize and init jointly).
        loftq_iters: LoftQ alternating steps T.
        epochs: epochs (the PLR protocol uses up to 10 and keeps the best).
        max_steps: stop after this many optimizer steps (0 = all epochs).
        lr: learning rate.
        batch_size: effective batch (rows per optimizer step).
        micro_batch_size: rows per forward pass; must divide batch_size. auto: the largest that fits
            --memory-budget by restora's memory planner (`restora plan --mode train`), base loading included.
        memory_budget: with --micro-batch-size auto: memory the run may use, e.g. 20GiB (default: what the
            machine has available now).
        schedule: learning-rate schedule after warmup.
        warmup_ratio: fraction of steps for linear warmup.
        optimizer: adamw, adamw8bit (blockwise 8-bit moments), paged_adamw8bit (bitsandbytes, CUDA).
        bf16: bf16 autocast compute.
        grad_checkpointing: recompute activations in backward to save memory.
        compile: torch.compile the decoder blocks while training (about 2x faster on SmolLM2 on CPU, after a
            one-time compile of ~40 s); auto = on for models of 50M+ parameters, off under --parallel fsdp, and
            off for a quantized base whose dequantized weights (which compiled blocks keep for the backward)
            would pass 2 GiB: past about 1B parameters, eager training keeps only the codes.
        max_samples: use at most this many training rows (0 = all).
        val_samples: validation rows for the per-epoch validation loss.
        max_len: token cap per example.
        chat: use the tokenizer's chat template around prompts.
        seed: seed for splits, data order and init.
        calib_samples: GPTQ calibration rows (train split).
        resume: continue a killed run from OUT/checkpoint (refused if any model, base, adapter or data setting
            differs from the run's).
        overwrite: start over in an OUT that holds a run, removing its adapter, checkpoint and metrics.
        parallel: under torchrun, ddp (every rank holds the base; adapter gradients all-reduced) or fsdp
            (FSDP2 shards the frozen base and the adapter; bases float, nf4, fp4, int8, rtn, gptq).
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    large = _params(model) >= RELEASE_MIN_PARAMS
    release_freed_memory(default=large)  # freed memory back to the OS (core.runtime)
    if micro_batch_size == "auto":
        micro_batch_size = _auto_micro_batch(model, memory_budget, batch_size, format, bits, group_size, adapter,
                                             rank, targets, max_len, optimizer, grad_checkpointing, compile, dropout,
                                             bf16, calib_samples)
    cfg = TrainConfig(
        epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, micro_batch_size=micro_batch_size,
        schedule=schedule, warmup_ratio=warmup_ratio, optimizer=optimizer, bf16=bf16,
        grad_checkpointing=grad_checkpointing, seed=seed,
    )
    t = get_task(task)
    target_arg: str | list[str] = targets if targets in ("attn", "all") or "," not in targets else targets.split(",")
    choice = base_choice(format, bits, group_size, task, calib_samples, seed)
    splits = split_rows(t, seed, data_dir)  # data problems surface before any quantization work
    torch.manual_seed(seed)

    dist_info = init_distributed(parallel)
    run = {k: v for k, v in locals().items() if k in RUN_SETTINGS}  # what --resume must find unchanged
    run.update(task=t.name, data=rows_hash([splits.train, splits.validation]))
    prepare_out(out, resume, overwrite, cfg, run, clear=dist_info.is_main)  # before any expensive work
    if not dist_info.is_main:
        barrier(dist_info)  # under torchrun, rank 0 quantizes and caches the base first
    if init == "loftq":
        loaded = build_loftq_base(model, choice.spec, rank, alpha, rslora, target_arg, loftq_iters)
    else:
        loaded = build_base(model, choice, data_dir)
    if dist_info.enabled and dist_info.is_main:
        barrier(dist_info)
    m, tok = loaded.model, loaded.tokenizer
    if bf16 and choice.spec.is_float and init != "loftq":
        to_dtype(m, torch.bfloat16)  # a 16-bit float base, as PEFT's bf16 runs (the fp32 file's pages dropped as it goes)
    elif bf16 and not choice.spec.is_float:
        # the parts left unquantized (embeddings, tied head, norms) held in bf16 as a bf16 base holds them, so that
        # the two bases differ only in their linear layers (an fp32 residual stream cost a 4-bit step ~2%)
        cast_unquantized(m, torch.bfloat16)
    if large:
        for q in m.modules():
            if isinstance(q, QuantizedWeight):
                q.keep_layouts = False
    torch.manual_seed(seed)  # adapter init must not depend on how the base was built (cache or not)
    if adapter == "lora":
        lcfg = LoRAConfig(r=rank, alpha=alpha, dropout=dropout, use_rslora=rslora,
                          init="gaussian" if init == "gaussian" else "default", target_modules=target_arg)
        add_lora(m, lcfg)
        if init == "loftq":
            _load_loftq_init(m, loaded.loftq)  # type: ignore[attr-defined]
            _save_loftq_init(Path(out), loaded.loftq)  # type: ignore[attr-defined]
    else:
        add_ia3(m, IA3Config() if targets in ("all", "attn") else IA3Config(target_modules=target_arg))
    train_rows = splits.train[:max_samples] if max_samples else splits.train
    val_rows = splits.validation[:val_samples]
    enc_train = encode_rows(t, tok, train_rows, max_len, chat)
    enc_val = encode_rows(t, tok, val_rows, max_len, chat) if val_rows else []
    settings = {"task": t.name, "init": init, "max_samples": max_samples, "max_len": max_len, "chat": chat,
                "calibration": choice.calibration_info(), "loftq_iters": loftq_iters if init == "loftq" else None,
                **cfg.resume_key()}
    provenance = {"base_model": loaded.source, "source_hash": loaded.source_hash, "quantization": choice.spec, "training": settings}

    def save_best(folder: Path, metrics: dict) -> None:
        save_adapter(m, folder, {**provenance, "metrics": metrics})

    m.to(device_for(dist_info))  # this rank's GPU when CUDA is present (NCCL), else stays on the CPU
    n_params = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    cfg.compile = compile_for_training(compile, n_params, next(m.parameters()).device,
                                       ModelShape.from_config(m.config).linear_params(), choice.spec.format or "float",
                                       sharded=dist_info.fsdp)
    summary = run_train(m, enc_train, enc_val, cfg, out, tok.pad_token_id, save_best, resume=resume,
                        dist_info=dist_info, run=run)
    if not dist_info.is_main:
        return 0
    _record_metrics(Path(out), summary)
    best = summary["best_val_loss"]
    print(f"trained {summary['steps']} steps on {len(enc_train)} rows ({choice.spec.label()} base), "
          f"{summary['tokens_per_s']:.0f} tokens/s; best epoch {summary['best_epoch']}"
          + (f", validation loss {best:.4f}" if best is not None else ""))
    print(f"adapter: {out}")
    return 0


def _record_metrics(folder: Path, summary: dict) -> None:
    """Put the run's final training summary into the best adapter's restora.json (atomically)."""
    path = folder / "restora.json"
    record = json.loads(path.read_text())
    record["metrics"] = {**(record.get("metrics") or {}), **summary}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _save_loftq_init(folder: Path, results: dict) -> None:
    """Keep LoftQ's initial B0 A0 beside the adapter (PEFT key names), for restoration modes."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, res in results.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = res.lora_A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = res.lora_B.contiguous()
    tmp = folder / "loftq_init.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / "loftq_init.safetensors")


def _load_loftq_init(model, results: dict) -> None:
    with torch.no_grad():
        for name, res in results.items():
            layer = model.get_submodule(name)
            layer.lora_A.weight.copy_(res.lora_A)
            layer.lora_B.weight.copy_(res.lora_B)


def _auto_micro_batch(model: str, memory_budget: str | None, batch_size: int, format: str, bits: int, group_size: int,
                      adapter: str, rank: int, targets: str, max_len: int, optimizer: str, grad_checkpointing: bool,
                      compile: str, dropout: float, bf16: bool, calib_samples: int) -> int:
    """--micro-batch-size auto: the largest micro-batch dividing batch_size whose plan fits the budget."""
    config = AutoConfig.from_pretrained(str(resolve_source(model)))
    budget = budget_or_available(parse_budget(memory_budget) if memory_budget else None)
    source = source_dtype(config)
    plan = auto_micro_batch(
        config, budget, batch_size, format, 16 if format == "float" else bits, group_size=group_size,
        float_dtype="bf16" if bf16 else source, source_dtype=source, adapter=adapter, rank=rank,
        targets=targets if targets in ("attn", "all") else "all", seq_len=max_len, optimizer=optimizer,
        grad_checkpointing=grad_checkpointing, compiled=compiles(compile, config, format), dropout=dropout, bf16=bf16,
        calib_tokens=calib_samples * CALIB_MAX_LEN if format == "gptq" else 0)
    chosen = plan.settings["batch_size"]
    print(f"micro-batch {chosen} (auto): planned peak {format_bytes(plan.total)} of a {format_bytes(budget)} budget")
    return chosen


def _params(model: str) -> int:
    """Parameters of the model `model` names, from its config (0 when the config does not say)."""
    try:
        shape = ModelShape.from_config(AutoConfig.from_pretrained(str(resolve_source(model))))
    except (OSError, ValueError):
        return 0
    return shape.linear_params() + shape.vocab * shape.hidden
