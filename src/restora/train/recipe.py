"""The QLoRA training recipe: build the base at k bits, add the adapter, train it, keep the best epoch.

`train_adapter` is what `restora train` and the experiment grid run: it builds (or loads from cache) the
training base, holds its unquantized parts in bf16 as a bf16 base holds them, adds LoRA or (IA)³ (LoftQ
initialisation included), encodes the task's rows, runs restora.train.loop and writes a PEFT-compatible
adapter folder with restora.json provenance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from restora.adapters import IA3Config, LoRAConfig, add_ia3, add_lora, save_adapter
from restora.core.atomic import write_text_atomic
from restora.core.mapped import to_dtype
from restora.core.runtime import release_freed_memory
from restora.data import encode_rows, get_task, split_rows
from restora.models.bases import (
    CALIB_MAX_LEN,
    base_choice,
    build_base,
    build_loftq_base,
)
from restora.models.load import resolve_source
from restora.plan.choice import (
    auto_micro_batch,
    budget_or_available,
    compiles,
    source_dtype,
)
from restora.plan.memory import ModelShape, format_bytes, parse_budget
from restora.quant.base import QuantizedWeight
from restora.quant.model import cast_unquantized
from restora.train.config import (
    Base,
    BaseSettings,
    DataSettings,
    LoRASettings,
    TrainConfig,
)
from restora.train.distributed import barrier, device_for, init_distributed
from restora.train.loop import RUN_SETTINGS, prepare_out, rows_hash
from restora.train.loop import train as run_train

__all__ = ["Base", "BaseSettings", "DataSettings", "LoRASettings", "RELEASE_MIN_PARAMS", "TrainConfig", "train_adapter"]

# From here on a run is bound by memory: freed memory goes back to the OS (restora.core.runtime), and a quantized
# base keeps no kernel layout (the int4 kernel's second copy of the codes, built when validation runs without
# gradients: 3.9 GiB more at 8B), so the peak is the planner's.
RELEASE_MIN_PARAMS = 1_000_000_000


def train_adapter(
    model: str,
    *,
    out: str,
    task: str = "sql",
    adapter: Literal["lora", "ia3"] = "lora",
    base: BaseSettings = BaseSettings(),
    lora: LoRASettings = LoRASettings(),
    data: DataSettings = DataSettings(),
    optim: TrainConfig = TrainConfig(),
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
        adapter: lora or ia3.
        base: the training base: format, bits, group size, calibration rows (restora.train.config.BaseSettings).
        lora: the adapter's rank, alpha, dropout, targets and init (restora.train.config.LoRASettings).
        data: training and validation rows, token cap, chat template (restora.train.config.DataSettings).
        optim: epochs, learning rate, batches, optimizer, compile, seed (restora.train.config.TrainConfig).
        resume: continue a killed run from OUT/checkpoint (refused if any model, base, adapter or data setting
            differs from the run's).
        overwrite: start over in an OUT that holds a run, removing its adapter, checkpoint and metrics.
        parallel: under torchrun, ddp (every rank holds the base; adapter gradients all-reduced) or fsdp
            (FSDP2 shards the frozen base and the adapter; bases float, nf4, fp4, int8, rtn, gptq).
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    large = _params(model) >= RELEASE_MIN_PARAMS
    release_freed_memory(default=large)  # freed memory back to the OS (core.runtime)
    if optim.micro_batch_size == "auto":
        optim = replace(optim, micro_batch_size=_auto_micro_batch(model, adapter, base, lora, data, optim))
    seed = optim.seed
    t = get_task(task)
    targets = lora.targets
    target_arg: str | list[str] = targets if targets in ("attn", "all") or "," not in targets else targets.split(",")
    choice = base_choice(base.format, base.bits, base.group_size, task, base.calib_samples, seed)
    splits = split_rows(t, seed, data_dir)  # data problems surface before any quantization work
    torch.manual_seed(seed)

    dist_info = init_distributed(parallel)
    flat = {"model": model, "adapter": adapter, **asdict(base), **asdict(lora), **asdict(data)}
    run = {k: v for k, v in flat.items() if k in RUN_SETTINGS}  # what --resume must find unchanged
    run.update(task=t.name, data=rows_hash([splits.train, splits.validation]))
    prepare_out(out, resume, overwrite, optim, run, clear=dist_info.is_main)  # before any expensive work
    if not dist_info.is_main:
        barrier(dist_info)  # under torchrun, rank 0 quantizes and caches the base first
    if lora.init == "loftq":
        loaded = build_loftq_base(model, choice.spec, lora.rank, lora.alpha, lora.rslora, target_arg, lora.loftq_iters)
    else:
        loaded = build_base(model, choice, data_dir)
    if dist_info.enabled and dist_info.is_main:
        barrier(dist_info)
    m, tok = loaded.model, loaded.tokenizer
    if optim.bf16 and choice.spec.is_float and lora.init != "loftq":
        to_dtype(m, torch.bfloat16)  # a 16-bit float base, as PEFT's bf16 runs (the fp32 file's pages dropped as it goes)
    elif optim.bf16 and not choice.spec.is_float:
        # the parts left unquantized (embeddings, tied head, norms) held in bf16 as a bf16 base holds them, so that
        # the two bases differ only in their linear layers (an fp32 residual stream cost a 4-bit step ~2%)
        cast_unquantized(m, torch.bfloat16)
    if large:
        for q in m.modules():
            if isinstance(q, QuantizedWeight):
                q.keep_layouts = False
    torch.manual_seed(seed)  # adapter init must not depend on how the base was built (cache or not)
    if adapter == "lora":
        lcfg = LoRAConfig(r=lora.rank, alpha=lora.alpha, dropout=lora.dropout, use_rslora=lora.rslora,
                          init="gaussian" if lora.init == "gaussian" else "default", target_modules=target_arg)
        add_lora(m, lcfg)
        if lora.init == "loftq":
            _load_loftq_init(m, loaded.loftq)  # type: ignore[attr-defined]
            _save_loftq_init(Path(out), loaded.loftq)  # type: ignore[attr-defined]
    else:
        add_ia3(m, IA3Config() if targets in ("all", "attn") else IA3Config(target_modules=target_arg))
    train_rows = splits.train[:data.max_samples] if data.max_samples else splits.train
    val_rows = splits.validation[:data.val_samples]
    enc_train = encode_rows(t, tok, train_rows, data.max_len, data.chat)
    enc_val = encode_rows(t, tok, val_rows, data.max_len, data.chat) if val_rows else []
    settings = {"task": t.name, "init": lora.init, "max_samples": data.max_samples, "max_len": data.max_len,
                "chat": data.chat, "calibration": choice.calibration_info(),
                "loftq_iters": lora.loftq_iters if lora.init == "loftq" else None, **optim.resume_key()}
    provenance = {"base_model": loaded.source, "source_hash": loaded.source_hash, "quantization": choice.spec, "training": settings}

    def save_best(folder: Path, metrics: dict) -> None:
        save_adapter(m, folder, {**provenance, "metrics": metrics})

    m.to(device_for(dist_info))  # this rank's GPU when CUDA is present (NCCL), else stays on the CPU
    summary = run_train(m, enc_train, enc_val, optim, out, tok.pad_token_id, save_best, resume=resume,
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
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


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


def _auto_micro_batch(model: str, adapter: str, base: BaseSettings, lora: LoRASettings, data: DataSettings,
                      optim: TrainConfig) -> int:
    """--micro-batch-size auto: the largest micro-batch dividing batch_size whose plan fits the budget."""
    config = AutoConfig.from_pretrained(str(resolve_source(model)))
    budget = budget_or_available(parse_budget(optim.memory_budget) if optim.memory_budget else None)
    source = source_dtype(config)
    fmt = base.format
    plan = auto_micro_batch(
        config, budget, optim.batch_size, fmt, 16 if fmt == "float" else base.bits, group_size=base.group_size,
        float_dtype="bf16" if optim.bf16 else source, source_dtype=source, adapter=adapter, rank=lora.rank,
        targets=lora.targets if lora.targets in ("attn", "all") else "all", seq_len=data.max_len,
        optimizer=optim.optimizer, grad_checkpointing=optim.grad_checkpointing,
        compiled=compiles(optim.compile, config, fmt), dropout=lora.dropout, bf16=optim.bf16,
        calib_tokens=base.calib_samples * CALIB_MAX_LEN if fmt == "gptq" else 0)
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
