"""Decoding throughput: restora's batched greedy decoding vs Hugging Face `generate`, SmolLM2-135M.

All decoders decode the same SQL Create Context prompts greedily for a fixed number of new
tokens (no early stop: EOS is ignored by forcing min_new_tokens for HF and by passing no
stop strings to restora, whose count is the tokens it generated), in one process, bf16
compute on CPU:

    hf generate (bf16)              model.generate(..., do_sample=False) on the bf16 model
    restora (bf16)                  restora.generate.greedy_generate on the same bf16 model: lean
                                    static-cache forward (restora.decode), weights pre-packed for
                                    oneDNN (restora.packed) -- what `restora eval/generate` do
    restora (bf16, hf forward)      the same loop through transformers' forward (lean=False)
    restora (rtn 4-bit)             greedy_generate over a 4-bit RTN base (fused int4 kernel)
    restora (rtn 4-bit, compiled)   the same with compile=True (one-token steps as one graph);
                                    its one-time compile happens in the warm-up run

    python benchmarks/generate.py [--new-tokens 48] [--threads 2] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled row (its first run compiles)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from restora.data import get_task, task_split
    from restora.generate import greedy_generate
    from restora.models import load_model
    from restora.quant import QuantSpec, quantize_model

    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    t = get_task("sql")
    prompts = [t.prompt(r) for r in task_split("sql", "test", 0, limit=max(a.batches))]
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

    def run_ours(model, batch: list[str], **kw) -> int:
        counted: list[int] = []

        class _Counting:  # the decoded text can re-tokenize differently: count the generated ids instead
            def __getattr__(self, name):
                return getattr(tok, name)

            def __call__(self, *args, **kwargs):
                return tok(*args, **kwargs)

            def decode(self, ids, **kwargs):
                if kwargs.get("skip_special_tokens"):
                    counted.append(len(ids))
                return tok.decode(ids, **kwargs)

        greedy_generate(model, _Counting(), batch, max_new_tokens=a.new_tokens, batch_size=len(batch), stop=(), **kw)
        return sum(counted)

    decoders = [
        ("hf generate (bf16)", lambda b: run_hf(b)),
        ("restora (bf16)", lambda b: run_ours(m, b)),
        ("restora (bf16, hf forward)", lambda b: run_ours(m, b, lean=False)),
        ("restora (rtn 4-bit)", lambda b: run_ours(q, b)),
    ]
    if not a.no_compile:
        decoders.append(("restora (rtn 4-bit, compiled)", lambda b: run_ours(q, b, compile=True)))
    print(f"| decoder | batch | new tokens/s | vs HF |  ({a.threads} threads, {a.new_tokens} new tokens)")
    print("|---|---|---|---|")
    for b in a.batches:
        batch = prompts[:b]
        rates = {}
        for name, fn in decoders:
            fn(batch)  # warm-up (and the one-time compile)
            t0 = time.perf_counter()
            n = fn(batch)
            rates[name] = n / (time.perf_counter() - t0)
            print(f"| {name} | {b} | {rates[name]:.0f} | {rates[name] / rates['hf generate (bf16)']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
