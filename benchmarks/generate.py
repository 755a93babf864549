"""Decoding throughput: restora's batched greedy decoding vs Hugging Face `generate`, SmolLM2-135M.

All decoders decode the same SQL Create Context prompts greedily for a fixed number of new
tokens (no early stop: EOS is ignored by forcing min_new_tokens for HF and by passing no
stop strings to restora, whose count is the tokens it generated), in one process, bf16
compute on CPU:

    hf generate (bf16)              model.generate(..., do_sample=False) on the bf16 model
    restora (bf16)                  restora.infer.generate.greedy_generate on the same bf16 model: lean
                                    static-cache forward (restora.infer.decode), weights pre-packed for
                                    oneDNN (restora.kernels.packed) -- what `restora eval/generate` do
    restora (bf16, hf forward)      the same loop through transformers' forward (lean=False)
    restora (rtn 4-bit)             greedy_generate over a 4-bit RTN base: restora's AMX int4 kernel
                                    for 2+ rows (restora.kernels.int4), torch's int4 GEMV for 1
    restora (rtn 4-bit, compiled)   the same with compile=True (decoding steps as one graph);
                                    its one-time compile happens in the warm-up run
    restora (nf4)                   over an NF4 base (blocks of 64, no double quantization): the
                                    AMX kernel with NF4's code table, any number of rows
    restora (bf16, compiled)        compile=True on the bf16 model: the graph calls the packed layers
                                    through restora::packed_linear (`restora eval --compile`)

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
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows (their first run compiles)")
    ap.add_argument("--lookup", type=int, default=4, help="draft tokens per step of the speculative rows (0: none)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from restora.data import get_task, task_split
    from restora.infer.generate import greedy_generate
    from restora.models.load import load_model
    from restora.quant import QuantSpec, quantize_model

    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    t = get_task("sql")
    prompts = [t.prompt(r) for r in task_split("sql", "test", 0, limit=max(a.batches))]
    m = loaded.model.to(torch.bfloat16).eval()
    q = load_model("smollm2-135m").model.eval()
    quantize_model(q, QuantSpec("rtn", 4, 64), progress=False)
    nf4 = load_model("smollm2-135m").model.eval()
    quantize_model(nf4, QuantSpec("nf4", 4, 64), progress=False)

    def run_hf(batch: list[str], **kw) -> int:
        tok.padding_side = "left"
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = m.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, **kw)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(batch)

    from restora.infer.decode import LeanDecoder

    forwards: list[int] = []  # rows fed per lean forward after the prompt pass, for tokens/step
    lean_forward = LeanDecoder.forward

    def counting_forward(self, ids, *args, **kwargs):
        forwards.append(ids.shape[0])
        return lean_forward(self, ids, *args, **kwargs)

    LeanDecoder.forward = counting_forward

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

        forwards.clear()
        greedy_generate(model, _Counting(), batch, max_new_tokens=a.new_tokens, batch_size=len(batch), stop=(), **kw)
        per_step[0] = sum(counted) / max(1, sum(forwards[1:])) if forwards else 1.0  # the first forward is the prompt
        return sum(counted)

    per_step = [1.0]

    decoders = [
        ("hf generate (bf16)", lambda b: run_hf(b)),
        ("restora (bf16)", lambda b: run_ours(m, b)),
        ("restora (bf16, hf forward)", lambda b: run_ours(m, b, lean=False)),
        ("restora (rtn 4-bit)", lambda b: run_ours(q, b)),
        ("restora (nf4)", lambda b: run_ours(nf4, b)),
    ]
    if not a.no_compile:
        decoders += [("restora (bf16, compiled)", lambda b: run_ours(m, b, compile=True)),
                     ("restora (rtn 4-bit, compiled)", lambda b: run_ours(q, b, compile=True)),
                     ("restora (nf4, compiled)", lambda b: run_ours(nf4, b, compile=True))]
    if a.lookup:
        k = a.lookup
        decoders += [(f"hf generate (bf16, lookup {k})", lambda b: run_hf(b, prompt_lookup_num_tokens=k)),
                     (f"restora (bf16, lookup {k})", lambda b: run_ours(m, b, speculate=k)),
                     (f"restora (rtn 4-bit, lookup {k})", lambda b: run_ours(q, b, speculate=k))]
        if not a.no_compile:
            decoders += [(f"restora (bf16, compiled, lookup {k})", lambda b: run_ours(m, b, compile=True, speculate=k)),
                         (f"restora (rtn 4-bit, compiled, lookup {k})", lambda b: run_ours(q, b, compile=True,
                                                                                            speculate=k))]
    print(f"| decoder | batch | new tokens/s | vs HF | tokens/step |  ({a.threads} threads, {a.new_tokens} new tokens)")
    print("|---|---|---|---|---|")
    for b in a.batches:
        batch = prompts[:b]
        rates = {}
        for name, fn in decoders:
            if name.startswith("hf generate (bf16, lookup") and b > 1:
                continue  # transformers' prompt lookup decodes one row at a time
            fn(batch)  # warm-up (and the one-time compile)
            per_step[0] = 1.0
            t0 = time.perf_counter()
            n = fn(batch)
            rates[name] = n / (time.perf_counter() - t0)
            step = f"{per_step[0]:.2f}" if name.startswith("restora") and "hf forward" not in name else ""
            print(f"| {name} | {b} | {rates[name]:.0f} | {rates[name] / rates['hf generate (bf16)']:.2f}x | {step} |",
                  flush=True)


if __name__ == "__main__":
    main()
