"""How much of its base's quantization error a QLoRA adapter has learned to cancel.

An adapter trained on a k-bit base Q(W) was fitted so that Q(W) + ΔW (ΔW = s·BA) does the task. Restoring the
base to W adds the error E = W − Q(W) on top. If training taught the adapter to cancel part of that error, ΔW
points along E, and the restored model gets that correction twice. Per adapter, summed over its layers:

- cos(ΔW, E) in weight space, and the share of E that ΔW cancels along E's direction, <ΔW, E> / |E|²;
- the same in activation space, where it matters: <ΔW, E>_H = tr(ΔW H Eᵀ) with H = XᵀX the Gram matrix of the
  layer's inputs X over --rows training rows of the adapter's task (GPTQ pushes its error into the directions
  that the inputs use least, so the two spaces differ);
- for comparison, the most a rank-r update could cancel in weight space, |E_r|² / |E|².

A 16-bit LoRA adapter, which never saw the quantized base, is the control: pass it with --control to compare
it with the error of the first adapter's base.

    python benchmarks/plr_alignment.py results/plr-study/adapters/sql-gptq-attn-steps16-3b-s0 \\
        results/plr-study/adapters/sql-gptq-attn-steps48-3b-s0 results/plr-study/adapters/sql-gptq-attn-3b-s0 \\
        --control results/plr-study/adapters/sql-lora-attn-16b-s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from restora.adapters.files import (
    read_adapter_config,
    read_adapter_weights,
    read_provenance,
)
from restora.adapters.loftq import lora_scaling
from restora.data import encode_rows, get_task, task_split
from restora.models.bases import base_choice, build_base
from restora.quant.linear import QuantLinear
from restora.restore.corrections import summed_inputs
from restora.restore.plr import build_trained_base


def _deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Each adapted layer's s·BA, by the layer's module name."""
    kind, config = read_adapter_config(folder)
    if kind != "lora":
        raise ValueError(f"{folder}: a LoRA adapter is needed, got {kind}")
    weights = read_adapter_weights(folder)
    scale = lora_scaling(config.r, config.alpha, config.use_rslora)
    out = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        out[name] = scale * (b.float() @ a.float())
    return out


def _errors(quantized: torch.nn.Module, source: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """E = W − Q(W) for each named layer of the quantized model."""
    out = {}
    for name in names:
        layer = quantized.get_submodule(name)
        if not isinstance(layer, QuantLinear):
            raise ValueError(f"{name} is not quantized in the base")
        out[name] = source[name + ".weight"].float() - layer.dequantize(torch.float32)
    return out


def input_grams(model: torch.nn.Module, tokenizer, task: str, names: list[str], rows: int,
                data_dir: str | None) -> dict[str, torch.Tensor]:
    """H = XᵀX of each named layer's inputs over the first `rows` training rows of `task` (float64)."""
    examples = encode_rows(get_task(task), tokenizer, task_split(task, "train", 0, data_dir, limit=rows), 512, False)
    batches = ({"input_ids": torch.tensor([ex["input_ids"]])} for ex in examples)
    grams, _ = summed_inputs(model, batches, names, lambda x: x.double().T @ x.double())
    return grams


def alignment(deltas: dict[str, torch.Tensor], errors: dict[str, torch.Tensor], grams: dict[str, torch.Tensor],
              rank: int) -> dict[str, float]:
    def inner(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor | None = None) -> float:
        return float((a * b).sum()) if h is None else float(((a.double() @ h) * b.double()).sum())

    dot = sum(inner(deltas[n], errors[n]) for n in deltas)
    dd = sum(inner(deltas[n], deltas[n]) for n in deltas)
    ee = sum(inner(errors[n], errors[n]) for n in deltas)
    dot_h = sum(inner(deltas[n], errors[n], grams[n]) for n in deltas)
    dd_h = sum(inner(deltas[n], deltas[n], grams[n]) for n in deltas)
    ee_h = sum(inner(errors[n], errors[n], grams[n]) for n in deltas)
    best = sum(float(torch.linalg.svdvals(errors[n])[:rank].pow(2).sum()) for n in deltas)
    return {"cos": dot / (dd * ee) ** 0.5, "cancelled": dot / ee, "cos_h": dot_h / (dd_h * ee_h) ** 0.5,
            "cancelled_h": dot_h / ee_h, "rank_r_bound": best / ee, "delta_over_error_h": (dd_h / ee_h) ** 0.5}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapters", nargs="+", type=Path, help="QLoRA adapter folders (restora)")
    p.add_argument("--control", type=Path, action="append", default=[],
                   help="a 16-bit LoRA adapter, compared with the error of the first adapter's base")
    p.add_argument("--rows", type=int, default=32, help="training rows whose layer inputs weigh the errors")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    source_model = read_provenance(args.adapters[0])["base_model"]
    loaded = build_base(source_model, base_choice("float", 16, 64, "sql", 1, 0), args.data_dir)
    source = loaded.model.float().eval()
    weights = source.state_dict()
    task = (read_provenance(args.adapters[0]).get("training") or {}).get("task", "sql")
    first_deltas = _deltas(args.adapters[0])  # its layers are the ones every adapter is measured on
    grams = input_grams(source, loaded.tokenizer, task, sorted(first_deltas), args.rows, args.data_dir)
    rows, first_errors = [], None
    for i, folder in enumerate(args.adapters):
        prov = read_provenance(folder)
        deltas = first_deltas if i == 0 else _deltas(folder)
        quantized = build_trained_base(prov, source_model, args.data_dir).model
        errors = _errors(quantized, weights, sorted(deltas))
        first_errors = first_errors or errors
        rank = read_adapter_config(folder)[1].r
        steps = (prov.get("metrics") or {}).get("steps")
        rows.append({"adapter": folder.name, "base": prov["quantization"], "steps": steps,
                     **alignment(deltas, errors, grams, rank)})
        del quantized
    for folder in args.control:
        deltas = _deltas(folder)
        steps = (read_provenance(folder).get("metrics") or {}).get("steps")
        rows.append({"adapter": folder.name + " (control, against the first base)", "base": "float", "steps": steps,
                     **alignment(deltas, first_errors, grams, read_adapter_config(folder)[1].r)})
    print("| adapter | steps | cos(ΔW, E) | E cancelled | cos_H(ΔW, E) | E cancelled, H | |ΔW|_H / |E|_H |"
          " rank-r bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['adapter']} | {r['steps']} | {r['cos']:+.4f} | {100 * r['cancelled']:+.2f}% | {r['cos_h']:+.4f} | "
              f"{100 * r['cancelled_h']:+.2f}% | {r['delta_over_error_h']:.3f} | {100 * r['rank_r_bound']:.1f}% |")
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
