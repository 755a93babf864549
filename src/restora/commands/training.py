"""Commands for fine-tuning and evaluation: train (QLoRA on any base) and eval (any base: PLR)."""

from __future__ import annotations

import json
from dataclasses import replace
import torch

from restora.adapters.files import (
    read_adapter_config,
    read_adapter_weights,
    read_provenance,
)
from restora.core.atomic import write_text_atomic
from restora.data import task_split
from restora.infer.evaluate import evaluate_task
from restora.infer.settings import EvalSettings
from restora.models.bases import base_choice, build_base
from restora.restore.adapter import RestoreOptions, restored
from restora.restore.plr import dequantize_model
from restora.train.recipe import train_adapter

__all__ = ["eval", "train"]

train = train_adapter  # `restora train` is the library recipe itself (its signature makes the CLI)



def eval(
    model: str,
    adapter: str | None = None,
    task: str = "sql",
    bits: int = 16,
    chat: bool = False,
    out: str | None = None,
    seed: int = 0,
    options: RestoreOptions = RestoreOptions(),
    scoring: EvalSettings = EvalSettings(),
    data_dir: str | None = None,
) -> int:
    """Evaluate MODEL (+ an adapter) on a task split, with the base at FORMAT/BITS (PLR: any l, not only k).

    Args:
        model: the float source model (hub id, folder, .gguf, smollm2-135m).
        adapter: adapter folder (restora or PEFT); none = the base alone.
        task: sql, gsm8k, or PATH.jsonl.
        bits: evaluation base bits l (--format: its format; without an adapter --format is required below 16).
        chat: use the tokenizer's chat template around prompts.
        out: write results.json here.
        seed: seed of the splits (must match training's).
        options: the evaluation base: its format and group size (default 64), and with an adapter how it is
            restored (restora.restore.adapter.RestoreOptions).
        scoring: which rows are scored and how (restora.infer.settings.EvalSettings).
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    options = replace(options, group_size=options.group_size or 64)
    format = options.format
    if format == "float" and bits != 16:
        raise ValueError(f"--format float is the 16-bit model, got --bits {bits}: pass a quantized --format or drop --bits")
    if format is None and bits != 16 and not adapter:
        raise ValueError(f"--bits {bits} without an adapter needs --format (nf4, fp4, int8, rtn or gptq)")
    choice = base_choice(format or "float", bits, options.group_size, task, options.calib_samples, seed)
    trained_on = None
    if adapter:  # the folder's three files checked before any model work: one-line errors naming file and field
        read_adapter_config(adapter)
        read_provenance(adapter)
        read_adapter_weights(adapter)
        loaded, rinfo, restoration = restored(adapter, bits, model, options, data_dir,
                                              calib_task=task, seed=seed, quiet=True)
        trained_on = rinfo.train_spec.to_dict() if rinfo.train_spec else None
        choice = replace(choice, spec=rinfo.restore_spec)  # what restore built (auto may keep the k-bit base)
    else:
        loaded = build_base(model, choice, data_dir)
    if scoring.materialize:
        dequantize_model(loaded.model, torch.bfloat16)
    split = scoring.split
    rows = task_split(task, split, seed, data_dir, limit=scoring.limit or None)
    res = evaluate_task(loaded.model, loaded.tokenizer, task, rows, scoring.max_new_tokens, scoring.batch_size,
                        generate=scoring.generate, use_chat_template=chat, speculate=scoring.speculate,
                        compile=scoring.compile)
    if adapter and restoration is not None:
        res["restoration"] = restoration
    res.update({"split": split, "adapter": adapter, "eval_base": choice.spec.to_dict(), "train_base": trained_on,
                "model": loaded.source, "source_hash": loaded.source_hash})
    for name, est in res.get("metrics", {}).items():
        print(f"{name}: {100 * est['value']:.2f}% (95% CI {100 * est['ci95_low']:.1f}-{100 * est['ci95_high']:.1f}, n={est['n']})")
    print(f"log loss: {res['log_loss']:.4f} nats/token on {res['n']} {split} rows ({choice.spec.label()} base)")
    if out:
        write_text_atomic(out, json.dumps(res, indent=2) + "\n")
    return 0
