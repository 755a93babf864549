"""Commands for fine-tuning and evaluation: train (QLoRA on any base) and eval (any base: PLR)."""

from __future__ import annotations

from dataclasses import replace

import json
from pathlib import Path
from typing import Literal

import torch

from ..quant.spec import QuantSpec

__all__ = ["eval", "train"]

Base = Literal["float", "nf4", "fp4", "int8", "rtn", "gptq"]
RestoreModeName = Literal["plain", "partial", "bias-correct", "partial+bias", "mean-match", "loftq", "auto"]  # restora.restoration.MODES


def _base_choice(format: str, bits: int, group_size: int, calib_task: str, calib_samples: int, seed: int):
    from ..bases import BaseChoice

    if format == "float":
        bits = 16
    return BaseChoice(QuantSpec(format=format, bits=bits, group_size=group_size), calib_task, calib_samples, 256, seed)


def train(
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
    micro_batch_size: int = 8,
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
        micro_batch_size: rows per forward pass; must divide batch_size.
        schedule: learning-rate schedule after warmup.
        warmup_ratio: fraction of steps for linear warmup.
        optimizer: adamw, adamw8bit (blockwise 8-bit moments), paged_adamw8bit (bitsandbytes, CUDA).
        bf16: bf16 autocast compute.
        grad_checkpointing: recompute activations in backward to save memory.
        compile: torch.compile the decoder blocks while training (about 2x faster on SmolLM2 on CPU, after a
            one-time compile of ~40 s); auto = on for models of 50M+ parameters, off under --parallel fsdp.
        max_samples: use at most this many training rows (0 = all).
        val_samples: validation rows for the per-epoch validation loss.
        max_len: token cap per example.
        chat: use the tokenizer's chat template around prompts.
        seed: seed for splits, data order and init.
        calib_samples: GPTQ calibration rows (train split).
        resume: continue a killed run from OUT/checkpoint.
        parallel: under torchrun, ddp (every rank holds the base; adapter gradients all-reduced) or fsdp
            (FSDP2 shards the frozen base and the adapter; bases float, nf4, fp4, int8, rtn, gptq).
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    from ..adapters import IA3Config, LoRAConfig, add_ia3, add_lora, save_adapter
    from ..bases import build_base
    from ..data import encode_rows, get_task, split_rows
    from ..train import TrainConfig
    from ..train import train as run_train

    cfg = TrainConfig(
        epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, micro_batch_size=micro_batch_size,
        schedule=schedule, warmup_ratio=warmup_ratio, optimizer=optimizer, bf16=bf16,
        grad_checkpointing=grad_checkpointing, seed=seed,
    )
    t = get_task(task)
    target_arg: str | list[str] = targets if targets in ("attn", "all") or "," not in targets else targets.split(",")
    choice = _base_choice(format, bits, group_size, task, calib_samples, seed)
    splits = split_rows(t, seed, data_dir)  # data problems surface before any quantization work
    torch.manual_seed(seed)
    from ..distributed import barrier, init_distributed

    dist_info = init_distributed(parallel)
    if not dist_info.is_main:
        barrier(dist_info)  # under torchrun, rank 0 quantizes and caches the base first
    if init == "loftq":
        from ..bases import build_loftq_base

        loaded = build_loftq_base(model, choice.spec, rank, alpha, rslora, target_arg, loftq_iters)
    else:
        loaded = build_base(model, choice, data_dir)
    if dist_info.enabled and dist_info.is_main:
        barrier(dist_info)
    m, tok = loaded.model, loaded.tokenizer
    if bf16 and choice.spec.is_float and init != "loftq":
        from ..mapped import to_dtype

        to_dtype(m, torch.bfloat16)  # a 16-bit float base, as PEFT's bf16 runs (the fp32 file's pages dropped as it goes)
    elif bf16 and not choice.spec.is_float:
        from ..quant.model import cast_unquantized

        # the parts left unquantized (embeddings, tied head, norms) held in bf16 as a bf16 base holds them, so that
        # the two bases differ only in their linear layers (an fp32 residual stream cost a 4-bit step ~2%)
        cast_unquantized(m, torch.bfloat16)
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

    from ..compiled import resolve_compile
    from ..distributed import device_for

    m.to(device_for(dist_info))  # this rank's GPU when CUDA is present (NCCL), else stays on the CPU
    cfg.compile = resolve_compile(compile, m, sharded=dist_info.fsdp)
    summary = run_train(m, enc_train, enc_val, cfg, out, tok.pad_token_id, save_best, resume=resume,
                        dist_info=dist_info)
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
    from safetensors.torch import save_file

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


def eval(
    model: str,
    adapter: str | None = None,
    task: str = "sql",
    split: Literal["train", "validation", "test"] = "test",
    format: Base | None = None,
    bits: int = 16,
    group_size: int = 64,
    limit: int = 0,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    generate: bool = True,
    chat: bool = False,
    out: str | None = None,
    seed: int = 0,
    calib_samples: int = 500,
    force: bool = False,
    restore_mode: RestoreModeName = "plain",
    restore_layers: str | None = None,
    restore_modules: str | None = None,
    calib_rows: int = 64,
    auto_min_gain: float = 0.0,
    materialize: bool = True,
    data_dir: str | None = None,
    speculate: int = 0,
    compile: bool = False,
) -> int:
    """Evaluate MODEL (+ an adapter) on a task split, with the base at FORMAT/BITS (PLR: any l, not only k).

    Args:
        model: the float source model (hub id, folder, .gguf, smollm2-135m).
        adapter: adapter folder (restora or PEFT); none = the base alone.
        task: sql, gsm8k, or PATH.jsonl.
        split: which split to score (test is never used in training).
        format: evaluation base format (default: float at 16 bits; with an adapter below 16 bits, the
            training format if it has that width, else int8 at 8 or rtn, as restore picks).
        bits: evaluation base bits l.
        group_size: quantization group size.
        limit: score only the first N rows (0 = all).
        max_new_tokens: generation cap.
        batch_size: rows per forward pass.
        generate: also generate and score answers (else log loss only).
        chat: use the tokenizer's chat template around prompts.
        out: write results.json here.
        seed: seed of the splits (must match training's).
        calib_samples: GPTQ calibration rows (train split).
        force: load an adapter whose recorded source hash differs.
        restore_mode: plain PLR, partial, bias-correct, partial+bias, mean-match, loftq (LoftQ adapters), or auto (searches on the validation split).
        restore_layers: partial: decoder blocks to restore, e.g. 0-14.
        restore_modules: partial: attn, mlp, or a regex over layer names.
        calib_rows: training rows for the bias correction's mean inputs.
        auto_min_gain: auto: restore only if that beats keeping the k-bit base by this fraction of its validation loss.
        materialize: dequantize each layer once to bf16 for fast evaluation (same numbers under bf16 compute).
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
        speculate: verify up to K prompt-lookup draft tokens per decoding step (greedy output; 0 = off).
        compile: run decoding steps as one torch.compile'd graph (SmolLM2, bf16, 2 threads: ~1.15x the tokens/s
            at batch 8 and ~1.1x at batch 1, after a one-time compile of 40-75 s per shape: batch 1 or more,
            1 or more tokens per step); worth it on long evaluations. bf16 results can differ from eager
            decoding by rounding.
    """
    from ..bases import build_base
    from ..data import task_split
    from ..evaluate import evaluate_task

    if format == "float" and bits != 16:
        raise ValueError(f"--format float is the 16-bit model, got --bits {bits}: pass a quantized --format or drop --bits")
    if format is None and bits != 16 and not adapter:
        raise ValueError(f"--bits {bits} without an adapter needs --format (nf4, fp4, int8, rtn or gptq)")
    choice = _base_choice(format or "float", bits, group_size, task, calib_samples, seed)
    trained_on = None
    if adapter:
        from .restoring import restored

        loaded, rinfo, restoration = restored(adapter, bits, format, group_size, model, "source", force, calib_samples,
                                              restore_mode, restore_layers, restore_modules, calib_rows, data_dir,
                                              auto_min_gain, calib_task=task, seed=seed, quiet=True)
        trained_on = rinfo.train_spec.to_dict() if rinfo.train_spec else None
        choice = replace(choice, spec=rinfo.restore_spec)  # what restore built (auto may keep the k-bit base)
    else:
        loaded = build_base(model, choice, data_dir)
    if materialize:
        from ..restore import dequantize_model

        dequantize_model(loaded.model, torch.bfloat16)
    rows = task_split(task, split, seed, data_dir, limit=limit or None)
    res = evaluate_task(loaded.model, loaded.tokenizer, task, rows, max_new_tokens, batch_size,
                        generate=generate, use_chat_template=chat, speculate=speculate, compile=compile)
    if adapter and restoration is not None:
        res["restoration"] = restoration
    res.update({"split": split, "adapter": adapter, "eval_base": choice.spec.to_dict(), "train_base": trained_on,
                "model": loaded.source, "source_hash": loaded.source_hash})
    for name, est in res.get("metrics", {}).items():
        print(f"{name}: {100 * est['value']:.2f}% (95% CI {100 * est['ci95_low']:.1f}-{100 * est['ci95_high']:.1f}, n={est['n']})")
    print(f"log loss: {res['log_loss']:.4f} nats/token on {res['n']} {split} rows ({choice.spec.label()} base)")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(out)
    return 0
