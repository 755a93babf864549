"""The typed functions behind `restora <command>`; restora.cli builds the parser from them.

Each function takes plain typed arguments (documented under "Args:"), does its work
through the library API, prints a human summary and returns an exit code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch

from .models import load_model
from .quant.checkpoint import save_quantized
from .quant.model import quantize_model
from .quant.spec import QuantSpec

__all__ = ["COMMANDS", "quantize", "info", "generate"]

Format = Literal["nf4", "fp4", "int8", "rtn", "gptq"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _task_texts(task: str, data_dir: str | None, n: int, seed: int, split: str) -> list[str]:
    """Full prompt+completion texts of `n` rows of a task split (train: seeded draw for calibration)."""
    from .data import calibration_rows, get_task, task_split

    t = get_task(task)
    rows = calibration_rows(t, n, seed, data_dir) if split == "train" else task_split(t, split, seed, data_dir, limit=n)
    return [t.text(row) for row in rows]


def quantize(
    model: str,
    *,
    out: str,
    format: Format = "nf4",
    bits: int = 4,
    group_size: int = 64,
    double_quant: bool = False,
    act_order: bool = False,
    calib_task: str = "sql",
    calib_samples: int = 500,
    calib_max_len: int = 256,
    eval_samples: int = 64,
    seed: int = 0,
    data_dir: str | None = None,
) -> int:
    """Quantize the linear layers of MODEL and write a checkpoint folder.

    Args:
        model: hub id, local HF folder, .gguf file, or the alias smollm2-135m.
        out: output folder (written atomically).
        format: nf4, fp4, int8, rtn (round-to-nearest k-bit) or gptq.
        bits: code width: 4 for nf4/fp4, 8 for int8, 2/3/4/8 for rtn and gptq.
        group_size: inputs per scale (nf4/fp4 block size; -1 = per output channel for int8/rtn/gptq).
        double_quant: nf4/fp4: quantize the absmax constants to 8 bits (QLoRA).
        act_order: gptq: quantize columns by decreasing Hessian diagonal.
        calib_task: task whose train split calibrates gptq and whose held-out rows measure perplexity (sql, gsm8k or PATH.jsonl).
        calib_samples: calibration rows for gptq (500 in the PLR report).
        calib_max_len: token cap per calibration row.
        eval_samples: held-out rows (validation split) for the perplexity report; 0 skips it.
        seed: seed for drawing calibration and evaluation rows.
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    spec = QuantSpec(format=format, bits=bits, group_size=group_size, double_quant=double_quant, act_order=act_order)
    loaded = load_model(model)
    if loaded.manifest is not None:
        raise ValueError(f"{model} is already a quantized checkpoint: quantize its source model instead")
    m, tok = loaded.model, loaded.tokenizer
    from .quant.model import check_spec_fits

    check_spec_fits(m, spec)
    calibration: list[torch.Tensor] | None = None
    calib_info = None
    if spec.format == "gptq":
        texts = _task_texts(calib_task, data_dir, calib_samples, seed, "train")
        calibration = [tok(t, return_tensors="pt", truncation=True, max_length=calib_max_len)["input_ids"][0] for t in texts]
        calib_info = {"task": calib_task, "samples": len(texts), "max_len": calib_max_len, "seed": seed, "split": "train"}
    eval_texts = _task_texts(calib_task, data_dir, eval_samples, seed, "validation") if eval_samples else []
    from .perplexity import perplexity

    ppl_source = perplexity(m, tok, eval_texts) if eval_texts else None
    t0 = time.perf_counter()
    quantize_model(m, spec, calibration)
    seconds = time.perf_counter() - t0
    ppl_quant = perplexity(m, tok, eval_texts) if eval_texts else None
    provenance = {
        "source": loaded.source,
        "source_hash": loaded.source_hash,
        "calibration": calib_info,
        "quantize_seconds": round(seconds, 2),
        "perplexity": None
        if ppl_source is None
        else {"task": calib_task, "split": "validation", "rows": len(eval_texts), "source": ppl_source, "quantized": ppl_quant},
    }
    folder = save_quantized(m, tok, out, spec, provenance)
    sizes = json.loads((folder / "restora_manifest.json").read_text())["sizes"]
    print(f"wrote {folder} ({spec.label()}, {seconds:.1f} s)")
    print(
        f"linear layers: {_human(sizes['quantized_linear_bytes'])} "
        f"(bf16: {_human(sizes['quantized_linear_bf16_bytes'])}); total {_human(sizes['total_bytes'])}"
    )
    if ppl_source is not None:
        print(f"held-out perplexity on {len(eval_texts)} {calib_task} rows: source {ppl_source:.3f} -> quantized {ppl_quant:.3f}")
    return 0


def info(folder: str) -> int:
    """Print the manifest and storage sizes of a quantized checkpoint folder.

    Args:
        folder: a folder written by `restora quantize`.
    """
    from .quant.checkpoint import read_manifest

    manifest = read_manifest(Path(folder))
    layers = manifest.pop("layers")
    sizes = manifest.get("sizes", {})
    print(json.dumps({k: v for k, v in manifest.items() if k != "sizes"}, indent=2))
    print(f"layers: {len(layers)} quantized linear layers")
    for k, v in sizes.items():
        print(f"{k}: {v} ({_human(v)})")
    if sizes.get("quantized_linear_bf16_bytes"):
        r = sizes["quantized_linear_bytes"] / sizes["quantized_linear_bf16_bytes"]
        print(f"linear layers take {r:.3f} of bf16 ({16 * r:.2f} bits per weight)")
    return 0


def generate(model: str, prompt: str, max_new_tokens: int = 64, chat: bool = False) -> int:
    """Greedy completion of PROMPT by MODEL (a model or a quantized checkpoint folder).

    Args:
        model: hub id, local HF folder, .gguf file, quantized checkpoint folder, or smollm2-135m.
        prompt: the prompt text.
        max_new_tokens: tokens to generate at most.
        chat: wrap the prompt in the tokenizer's chat template.
    """
    loaded = load_model(model)
    m, tok = loaded.model, loaded.tokenizer
    text = prompt
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = m.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


Base = Literal["float", "nf4", "fp4", "int8", "rtn", "gptq"]


def _base_choice(format: str, bits: int, group_size: int, calib_task: str, calib_samples: int, seed: int):
    from .bases import BaseChoice

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
    dropout: float = 0.05,
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
    max_samples: int = 0,
    val_samples: int = 200,
    max_len: int = 384,
    chat: bool = False,
    seed: int = 0,
    calib_samples: int = 500,
    resume: bool = False,
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
        max_samples: use at most this many training rows (0 = all).
        val_samples: validation rows for the per-epoch validation loss.
        max_len: token cap per example.
        chat: use the tokenizer's chat template around prompts.
        seed: seed for splits, data order and init.
        calib_samples: GPTQ calibration rows (train split).
        resume: continue a killed run from OUT/checkpoint.
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    from .adapters import IA3Config, LoRAConfig, add_ia3, add_lora, save_adapter
    from .bases import build_base
    from .data import encode_rows, get_task, split_rows
    from .train import TrainConfig, train as run_train

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
    if init == "loftq":
        loaded = _loftq_base(model, choice, rank, alpha, rslora, target_arg, loftq_iters)
    else:
        loaded = build_base(model, choice, data_dir)
    m, tok = loaded.model, loaded.tokenizer
    if adapter == "lora":
        lcfg = LoRAConfig(r=rank, alpha=alpha, dropout=dropout, use_rslora=rslora,
                          init="gaussian" if init == "gaussian" else "default", target_modules=target_arg)
        add_lora(m, lcfg)
        if init == "loftq":
            _load_loftq_init(m, loaded.loftq)  # type: ignore[attr-defined]
    else:
        add_ia3(m, IA3Config() if targets in ("all", "attn") else IA3Config(target_modules=target_arg))
    train_rows = splits.train[:max_samples] if max_samples else splits.train
    val_rows = splits.validation[:val_samples]
    enc_train = encode_rows(t, tok, train_rows, max_len, chat)
    enc_val = encode_rows(t, tok, val_rows, max_len, chat) if val_rows else []
    settings = {"task": t.name, "init": init, "max_samples": max_samples, "max_len": max_len, "chat": chat, **cfg.resume_key()}
    provenance = {"base_model": loaded.source, "source_hash": loaded.source_hash, "quantization": choice.spec, "training": settings}

    def save_best(folder: Path, metrics: dict) -> None:
        save_adapter(m, folder, {**provenance, "metrics": metrics})

    summary = run_train(m, enc_train, enc_val, cfg, out, tok.pad_token_id, save_best, resume=resume)
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


def _loftq_base(model: str, choice, rank: int, alpha: float, rslora: bool, targets, iters: int):  # noqa: ANN001, ANN202
    """Float source -> LoftQ on the LoRA targets, plain quantization elsewhere."""
    from .adapters.inject import select_targets
    from .adapters.loftq import LoftQConfig, loftq_init_model
    from .quant.linear import QuantLinear
    from .quant.model import quantizable_layers, set_module

    spec = choice.spec
    if spec.is_float:
        raise ValueError("init loftq needs a quantized base: pass --format and --bits")
    loaded = load_model(model)
    m = loaded.model
    names = select_targets(m, targets)
    fmt = "rtn" if spec.format == "gptq" else spec.format
    results = loftq_init_model(m, LoftQConfig(bits=spec.bits, format=fmt, group_size=spec.group_size, iters=iters),
                               rank, alpha, names, use_rslora=rslora)
    for name in quantizable_layers(m):
        if not isinstance(m.get_submodule(name), QuantLinear):
            set_module(m, name, QuantLinear.from_linear(m.get_submodule(name), spec))
    loaded.loftq = results
    return loaded


def _load_loftq_init(model, results: dict) -> None:  # noqa: ANN001
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
    format: Base = "float",
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
    data_dir: str | None = None,
) -> int:
    """Evaluate MODEL (+ an adapter) on a task split, with the base at FORMAT/BITS (PLR: any l, not only k).

    Args:
        model: the float source model (hub id, folder, .gguf, smollm2-135m).
        adapter: adapter folder (restora or PEFT); none = the base alone.
        task: sql, gsm8k, or PATH.jsonl.
        split: which split to score (test is never used in training).
        format: evaluation base format (float = 16-bit restore).
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
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    from .adapters import load_adapter
    from .bases import build_base
    from .data import task_split
    from .evaluate import evaluate_task

    choice = _base_choice(format, bits, group_size, task, calib_samples, seed)
    loaded = build_base(model, choice, data_dir)
    trained_on = None
    if adapter:
        info_ = load_adapter(loaded.model, adapter, expected_source_hash=loaded.source_hash, force=force)
        trained_on = (info_.provenance or {}).get("quantization")
    rows = task_split(task, split, seed, data_dir, limit=limit or None)
    res = evaluate_task(loaded.model, loaded.tokenizer, task, rows, max_new_tokens, batch_size,
                        generate=generate, use_chat_template=chat)
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


def demo(out: str = "runs/demo", calib_samples: int = 128, data_dir: str | None = None) -> int:
    """The embedded demo, offline: quantize SmolLM2-135M with GPTQ (4 bits, group 64) and RTN,
    report held-out perplexity of each against the float source, and show a greedy completion.

    Args:
        out: folder for the demo's checkpoints.
        calib_samples: GPTQ calibration rows from the SQL Create Context train split.
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    base = Path(out)
    for fmt in ("rtn", "gptq"):
        print(f"== {fmt} 4-bit, group 64 ==")
        quantize("smollm2-135m", str(base / f"{fmt}-4b"), format=fmt, bits=4, group_size=64,
                 calib_samples=calib_samples, data_dir=data_dir)
    prompt = "Write a SQL query that counts the rows of the table singer."
    print("== greedy completion from the 4-bit GPTQ checkpoint ==")
    return generate(str(base / "gptq-4b"), prompt, max_new_tokens=48, chat=True)


COMMANDS = {"quantize": quantize, "info": info, "generate": generate, "train": train, "eval": eval, "demo": demo}
