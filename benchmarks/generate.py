"""Decoding throughput: restora's batched greedy decoding vs Hugging Face `generate`, SmolLM2-135M.

Both decode the same SQL Create Context prompts greedily for a fixed number of new tokens
(no early stop: EOS is ignored by forcing min_new_tokens for HF and by counting generated
tokens for restora), in one process, bf16 compute on CPU:

    hf            model.generate(..., do_sample=False) on the bf16 model
    restora       restora.generate.greedy_generate on the same bf16 model
    restora rtn4  greedy_generate over a 4-bit RTN base (fused int4 decode kernel)

    python benchmarks/generate.py [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from restora.data import get_task, task_split
    from restora.generate import greedy_generate
    from restora.models import load_model
    from restora.quant import QuantSpec, quantize_model

    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    t = get_task("sql")
    prompts = [t.prompt(r) for r in task_split("sql", "test", 0, limit=8)]
    m = loaded.model.to(torch.bfloat16).eval()
    q = load_model("smollm2-135m").model.eval()
    quantize_model(q, QuantSpec("rtn", 4, 64), progress=False)

    def run_hf(batch: list[str]) -> int:
        tok.padding_side = "left"
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = m.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(batch)

    def run_ours(model, batch: list[str]) -> int:
        outs = greedy_generate(model, tok, batch, max_new_tokens=a.new_tokens, batch_size=len(batch), stop=())
        return sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)

    print("| decoder | batch | new tokens/s | vs HF |")
    print("|---|---|---|---|")
    for b in a.batches:
        batch = prompts[:b]
        rates = {}
        for name, fn in (("hf generate (bf16)", lambda: run_hf(batch)), ("restora (bf16)", lambda: run_ours(m, batch)),
                         ("restora (rtn 4-bit)", lambda: run_ours(q, batch))):
            fn()  # warm-up
            t0 = time.perf_counter()
            n = fn()
            rates[name] = n / (time.perf_counter() - t0)
        for name, r in rates.items():
            print(f"| {name} | {b} | {r:.0f} | {r / rates['hf generate (bf16)']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
