"""Commands for quantized checkpoints: quantize, info, generate, and the demo."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import torch

from restora.adapters import load_adapter
from restora.data import calibration_rows, get_task, task_split
from restora.infer.generate import greedy_generate
from restora.infer.perplexity import StreamedNLL
from restora.models.bases import BaseChoice, build_base, stream_quantize
from restora.models.load import MANIFEST, load_model, open_source, resolve_source
from restora.models.offload import offload as offload_blocks
from restora.quant.checkpoint import (
    WEIGHTS,
    read_manifest,
    save_quantized,
    verify_files,
)
from restora.quant.model import check_spec_fits
from restora.quant.spec import QuantSpec
from restora.restore.adapter import RestoreOptions, restored
from restora.restore.plr import restore_spec

__all__ = ["quantize", "info", "generate", "human_bytes"]

Format = Literal["nf4", "fp4", "int8", "rtn", "gptq"]
EVAL_SAMPLES = 64  # rows of the perplexity report by default
EVAL_MAX_PARAMS = 1_500_000_000  # above it (past 1B models) the report is off unless asked for


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _task_texts(task: str, data_dir: str | None, n: int, seed: int, split: str) -> list[str]:
    """Full prompt+completion texts of `n` rows of a task split (train: seeded draw for calibration)."""

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
    eval_samples: int | None = None,
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
        eval_samples: held-out rows (validation split) for the perplexity report, scored under bf16 as the weights
            stream (source and quantized in one pass); 0 skips it (default: 64 up to 1B parameters, else 0).
        seed: seed for drawing calibration and evaluation rows.
        data_dir: folder laid out like ../shared/data (else $RESTORA_DATA_DIR, else the hub).
    """
    spec = QuantSpec(format=format, bits=bits, group_size=group_size, double_quant=double_quant, act_order=act_order)
    where = resolve_source(model)
    if isinstance(where, Path) and (where / MANIFEST).is_file():
        raise ValueError(f"{model} is already a quantized checkpoint: quantize its source model instead")
    source = open_source(model)
    load = source.start()
    check_spec_fits(load.model, spec)
    digest = source.digest(load.model)
    tok = source.tokenizer()
    n_params = sum(p.numel() for p in load.model.parameters())
    if eval_samples is None:
        eval_samples = EVAL_SAMPLES if n_params <= EVAL_MAX_PARAMS else 0
        if not eval_samples:
            print(f"perplexity report skipped ({n_params / 1e9:.1f}B parameters; pass --eval-samples N to ask for it)")
    calibration: list[torch.Tensor] | None = None
    calib_info = None
    if spec.format == "gptq":
        texts = _task_texts(calib_task, data_dir, calib_samples, seed, "train")
        calibration = [tok(t, return_tensors="pt", truncation=True, max_length=calib_max_len)["input_ids"][0] for t in texts]
        calib_info = {"task": calib_task, "samples": len(texts), "max_len": calib_max_len, "seed": seed, "split": "train"}
    eval_texts = _task_texts(calib_task, data_dir, eval_samples, seed, "validation") if eval_samples else []
    nll = None
    if eval_texts:
        load.outside_blocks()
        rows = [tok(t, return_tensors="pt", truncation=True, max_length=512)["input_ids"][0] for t in eval_texts]
        nll = StreamedNLL(load.model, rows)
    t0 = time.perf_counter()
    m = stream_quantize(load, spec, calibration, before_block=nll.float_block if nll else None,
                        after_block=nll.quantized_block if nll else None)
    seconds = time.perf_counter() - t0
    ppl_source = ppl_quant = None
    if nll is not None:
        ppl_source, ppl_quant = (math.exp(v) for v in nll.result())
    provenance = {
        "source": model,
        "source_hash": digest,
        "calibration": calib_info,
        "quantize_seconds": round(seconds, 2),
        "perplexity": None
        if ppl_source is None
        else {"task": calib_task, "split": "validation", "rows": len(eval_texts), "source": ppl_source,
              "quantized": ppl_quant, "compute": "bf16"},
    }
    folder = save_quantized(m, tok, out, spec, provenance)
    sizes = json.loads((folder / "restora_manifest.json").read_text())["sizes"]
    print(f"wrote {folder} ({spec.label()}, {seconds:.1f} s)")
    print(
        f"linear layers: {human_bytes(sizes['quantized_linear_bytes'])} "
        f"(bf16: {human_bytes(sizes['quantized_linear_bf16_bytes'])}); total {human_bytes(sizes['total_bytes'])}"
    )
    if ppl_source is not None:
        print(f"held-out perplexity on {len(eval_texts)} {calib_task} rows: source {ppl_source:.3f} -> quantized {ppl_quant:.3f}")
    return 0


def info(folder: str) -> int:
    """Print the manifest and storage sizes of a quantized checkpoint folder, after verifying its files.

    Args:
        folder: a folder written by `restora quantize`.
    """
    manifest = read_manifest(Path(folder))  # the recorded sizes are checked here
    checked = verify_files(Path(folder), manifest)  # and the sha256 of every file (one-line error, exit 2)
    layers = manifest.pop("layers")
    files = manifest.pop("files", None)
    sizes = manifest.get("sizes", {})
    print(json.dumps({k: v for k, v in manifest.items() if k != "sizes"}, indent=2))
    print(f"layers: {len(layers)} quantized linear layers")
    for k, v in sizes.items():
        print(f"{k}: {v} ({human_bytes(v)})")
    if sizes.get("quantized_linear_bf16_bytes"):
        r = sizes["quantized_linear_bytes"] / sizes["quantized_linear_bf16_bytes"]
        print(f"linear layers take {r:.3f} of bf16 ({16 * r:.2f} bits per weight)")
    if files:
        print(f"files: {checked} verified (sizes and sha256 match the manifest)")
    else:
        print(f"files: no checksums recorded; {WEIGHTS} is whole (its header matches its size)")
    return 0


def generate(
    model: str,
    *,
    prompt: str,
    max_new_tokens: int = 64,
    adapter: str | None = None,
    bits: int | None = None,
    chat: bool = False,
    options: RestoreOptions = RestoreOptions(),
    speculate: int = 0,
    offload: bool = False,
) -> int:
    """Greedy completion of PROMPT by MODEL, optionally with an adapter on a chosen base.

    Args:
        model: hub id, local HF folder, .gguf file, quantized checkpoint folder, or smollm2-135m.
        prompt: the prompt text.
        max_new_tokens: tokens to generate at most.
        adapter: a restora or PEFT adapter folder to attach.
        bits: base bits l for the adapter (16 = float source): Post LoRA Restoration.
        chat: wrap the prompt in the tokenizer's chat template.
        options: the base (--format: default the model as given; with --bits: as restore picks) and how it is
            restored under --adapter (restora.restore.adapter.RestoreOptions).
        speculate: verify up to K prompt-lookup draft tokens per decoding step (greedy output; 0 = off).
        offload: keep MODEL's decoder blocks in their file and page them in one block at a time (a float folder
            or a quantized checkpoint, without --bits/--format): less memory, each step re-reads the weights.
    """

    format, restore_mode = options.format, options.restore_mode
    if offload and (bits is not None or format is not None):
        raise ValueError("--offload pages MODEL's own file: write the l-bit base with `restora restore` first, "
                         "then generate from that folder with --offload")
    if restore_mode != "plain" and (adapter is None or bits is None):
        raise ValueError(f"--restore-mode {restore_mode} needs --adapter and --bits (the restore level)")
    if bits is not None or format is not None:
        if adapter is None:
            loaded = build_base(model, BaseChoice(restore_spec(None, bits or 16, format)))
        else:
            loaded, _, _ = restored(adapter, bits or 16, model, options)
    else:
        loaded = load_model(model, mapped=offload)
        if offload:
            offload_blocks(loaded.model)
        if adapter is not None:
            load_adapter(loaded.model, adapter, expected_source_hash=loaded.source_hash, force=options.force)
            loaded.model.eval()
    tok = loaded.tokenizer
    text = prompt
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    # bf16 compute as `restora eval` decodes: packed float layers, restora's int4 kernels on 4-bit bases
    out = greedy_generate(loaded.model, tok, [text], max_new_tokens=max_new_tokens, add_special_tokens=not chat,
                          speculate=speculate)
    print(out[0])
    return 0
