"""GPTQ side by side: restora vs GPTQModel on SmolLM2-135M, in one process.

Both quantize the decoder linear layers at the same bits and group size from the same calibration
rows (SQL Create Context train, a seeded random sample), and are scored by the perplexity of the
completion text (the SQL answer, given its table and question) of other held-out rows. The float
model's perplexity on those rows is printed too. GPTQModel is optional: without it restora runs
alone.

    python benchmarks/quantize.py                      # 4 bits, group 64, 128 rows, 64 held out
    python benchmarks/quantize.py --no-gptqmodel

GPTQModel runs with its own defaults except bits and group size (group 128 does not divide
SmolLM2's 576 inputs). Its CPU worker pool defaults to (cores + 1) // 2 workers, 1 on a 2-core
machine, while its model-loader pool asks for 2 and refuses to start; so this sets
GPTQMODEL_CPU_WORKERS=2 unless it is already set. Its time is the quantize() call; its
perplexity is measured on the checkpoint it saves, loaded back with its torch kernel.
Times are wall and process CPU seconds; on a shared machine CPU time is the steadier of the two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restora.models.load import load_model
from restora.quant import QuantSpec, quantize_model

SQL = Path("/work/shared/data/sql_create_context/train.jsonl")


def sql_split(path: Path, seed: int, n_calib: int, n_eval: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A seeded random sample of rows: the first n_calib calibrate, the next n_eval are held out."""
    rows = [json.loads(line) for line in path.open()]
    idx = random.Random(seed).sample(range(len(rows)), n_calib + n_eval)
    return [rows[i] for i in idx[:n_calib]], [rows[i] for i in idx[n_calib:]]


def prompt_and_completion(row: dict[str, str]) -> tuple[str, str]:
    return f"{row['context']}\n-- {row['question']}\n", row["answer"]


def encode(tok: Any, row: dict[str, str], max_tokens: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion (at most max_tokens) and the number of prompt tokens."""
    prompt, completion = prompt_and_completion(row)
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(completion, add_special_tokens=False).input_ids
    return (p + c)[:max_tokens], len(p)


@torch.no_grad()
def heldout_perplexity(
    model: nn.Module, tok: Any, rows: list[dict[str, str]], max_tokens: int, batch: int = 16
) -> float:
    """exp(mean NLL of completion tokens given their prompt). Rows are right-padded into batches,
    so a quantized model dequantizes each weight once per batch rather than once per row."""
    nll, count = 0.0, 0
    for a in range(0, len(rows), batch):
        enc = [encode(tok, r, max_tokens) for r in rows[a : a + batch]]
        t = max(len(ids) for ids, _ in enc)
        x = torch.zeros(len(enc), t, dtype=torch.long)  # (B, T), padded with 0
        mask = torch.zeros(len(enc), t, dtype=torch.long)  # (B, T) attention mask
        scored = torch.zeros(len(enc), t - 1, dtype=torch.bool)  # (B, T-1) completion targets
        for k, (ids, n_prompt) in enumerate(enc):
            x[k, : len(ids)] = torch.tensor(ids)
            mask[k, : len(ids)] = 1
            scored[k, n_prompt - 1 : len(ids) - 1] = True
        logp = model(input_ids=x, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
        token_nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, T-1): predicts x[:, 1:]
        nll += token_nll[scored].sum().item()
        count += int(scored.sum())
    return math.exp(nll / count)


def run_restora(args: argparse.Namespace, calib: list[list[int]], heldout: list[dict[str, str]]) -> dict[str, Any]:
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model.eval(), loaded.tokenizer
    float_ppl = heldout_perplexity(model, tok, heldout, args.max_tokens)
    spec = QuantSpec("gptq", args.bits, args.group_size)
    t0, c0 = time.perf_counter(), time.process_time()
    quantize_model(model, spec, [torch.tensor(ids) for ids in calib], progress=not args.quiet)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    ppl = heldout_perplexity(model, tok, heldout, args.max_tokens)
    return {
        "float_ppl": float_ppl, "seconds": seconds, "cpu": cpu, "ppl": ppl,
        "folder": loaded.folder, "label": spec.label(),
    }


def run_gptqmodel(
    args: argparse.Namespace, folder: Path, calib: list[list[int]], heldout: list[dict[str, str]]
) -> dict[str, Any]:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # noqa: PLC0415 (optional peer)

    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size)
    model = GPTQModel.load(str(folder), cfg, device="cpu")
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calib]
    t0, c0 = time.perf_counter(), time.process_time()
    model.quantize(rows, batch_size=1, calibration_data_min_length=1)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    settings = {k: getattr(cfg, k, None) for k in ("sym", "desc_act", "act_group_aware", "damp_percent")}
    with tempfile.TemporaryDirectory() as out:
        model.save(out)
        del model
        qmodel = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH)
        hf = getattr(qmodel, "model", qmodel)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        ppl = heldout_perplexity(hf.eval(), tok, heldout, args.max_tokens)
    return {"seconds": seconds, "cpu": cpu, "ppl": ppl, "settings": settings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-rows", type=int, default=128)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-gptqmodel", action="store_true", help="run restora alone")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    calib_rows, heldout = sql_split(SQL, args.seed, args.calib_rows, args.eval_rows)
    tok = load_model("smollm2-135m").tokenizer
    calib = [encode(tok, r, args.max_tokens)[0] for r in calib_rows]
    n_tok = sum(map(len, calib))
    print(f"SmolLM2-135M, {args.calib_rows} calibration rows ({n_tok} tokens), {args.eval_rows} held-out rows,"
          f" seed {args.seed}, torch threads {torch.get_num_threads()}")

    r = run_restora(args, calib, heldout)
    results: list[tuple[str, float | None, float | None, float]] = [
        ("float (no quantization)", None, None, r["float_ppl"])
    ]
    results.append((f"restora {r['label']}", r["seconds"], r["cpu"], r["ppl"]))
    g: dict[str, Any] | None = None
    if not args.no_gptqmodel:
        try:
            import gptqmodel

            version = gptqmodel.__version__
        except ImportError as e:
            print(f"GPTQModel not importable ({e}); restora alone")
        else:
            try:
                g = run_gptqmodel(args, r["folder"], calib, heldout)
                name = f"GPTQModel {version} {args.bits}b-g{args.group_size}"
                results.append((name, g["seconds"], g["cpu"], g["ppl"]))
                print(f"GPTQModel settings: {g['settings']}")
            except Exception as e:  # report whatever stopped it, honestly, and keep restora's numbers
                print(f"GPTQModel failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores)")
    print(f"| {'method':<32} | {'wall time (s)':>13} | {'CPU time (s)':>12} | {'held-out ppl':>12} |")
    print(f"|{'-' * 34}|{'-' * 15}|{'-' * 14}|{'-' * 14}|")
    for name, secs, cpu, ppl in results:
        w = "-" if secs is None else f"{secs:.1f}"
        c = "-" if cpu is None else f"{cpu:.1f}"
        print(f"| {name:<32} | {w:>13} | {c:>12} | {ppl:>12.3f} |")
    if g is not None:
        print(f"\nrestora / GPTQModel: time {r['seconds'] / g['seconds']:.3f}, perplexity {r['ppl'] / g['ppl']:.4f}")


if __name__ == "__main__":
    main()
