"""Training throughput and peak memory: restora vs PEFT (+ bitsandbytes NF4) on SmolLM2-135M.

One command runs every configuration, each in its own fresh subprocess so that peak RSS
is per configuration, and prints one table with the ratios:

    restora bf16 base      LoRA r16 on all linear layers, completion-only loss, bf16 autocast,
                           compiled decoder blocks (what `restora train` does for this model size)
    restora nf4 base       same adapter over restora's NF4 (blockwise 64) base
    restora rtn4 base      same over uniform 4-bit (group 64)
    restora ... eager      the same without torch.compile (`--compile off`)
    restora ... padded     the same with the padded forward (restora.kernels.unpadded switched off)
    restora ... ckpt       the same with activation checkpointing of whole decoder blocks
                           (`restora train --grad-checkpointing`)
    peft bf16              transformers + peft LoRA, bf16 model, HF loss (labels, prompt masked)
    peft + bnb nf4         transformers + bitsandbytes 4-bit (CPU) + peft LoRA

Batch: B = 8 SQL Create Context rows (prompt masked), fused AdamW lr 2e-4 (what restora's trainer
and transformers' Trainer use by default), one optimizer step per
batch, 8 distinct batches in a cycle. Tokens/s counts every real input token (prompt included,
padding not), median of the timed steps. The warm-up is one pass over the 8 batches: it absorbs
the one-time compile (reported as "first steps") and, for every config alike, oneDNN's
per-shape kernel builds, so the timed steps reuse kernels as a long training run does.

    python benchmarks/train_step.py [--steps 8] [--warmup 8] [--threads 2] [--configs ...]
    python benchmarks/train_step.py --pair restora-bf16 restora-rtn4 [--rounds 32]

`--pair A B` measures the ratio that separate processes cannot on a noisy machine: both configurations in
one process, stepping in turn on the same batches (peak RSS is then the pair's, so not reported).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ["restora-bf16", "restora-nf4", "restora-rtn4", "restora-bf16-padded", "restora-bf16-eager", "restora-rtn4-eager",
           "restora-bf16-ckpt", "restora-rtn4-ckpt", "peft-bf16", "peft-bnb-nf4"]


def _rows(tok, n: int = 64):
    from restora.data import encode_rows, task_split

    rows = task_split("sql", "train", 0, limit=n)
    return encode_rows("sql", tok, rows, 256)


def _batches(enc, bsz: int):

    from restora.train.loop import _collate

    out = []
    for a in range(0, len(enc) - bsz + 1, bsz):
        out.append(_collate(enc[a : a + bsz], 0))
    return [(ids, labels, mask) for ids, labels, mask in out if ids.numel()]  # noqa: C416


def build(name: str):
    """Configuration `name` ready to train: (one training step on a batch -> its real tokens, batches)."""
    import torch

    if name.startswith("restora"):
        from restora.core.runtime import release_freed_memory

        release_freed_memory()  # only with RESTORA_MALLOC=release, as the restora CLI
    torch.manual_seed(0)
    from restora.models.load import load_model

    kept: list[object] = []
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    batches = _batches(_rows(tok), 8)
    if name.startswith("restora"):
        from restora.adapters import LoRAConfig, add_lora
        from restora.quant import QuantSpec, quantize_model
        from restora.train import loss as restora_train
        from restora.train.loop import completion_loss

        if name.endswith("-padded"):
            restora_train.can_unpad = lambda model: False  # the padded forward, for comparison

        if name.startswith("restora-bf16"):
            from restora.core.mapped import to_dtype

            to_dtype(model, torch.bfloat16)  # as `restora train`: the fp32 file's pages dropped as they convert
        else:
            spec = QuantSpec("nf4", 4, 64) if name.startswith("restora-nf4") else QuantSpec("rtn", 4, 64)
            quantize_model(model, spec, progress=False)
            from restora.quant.model import cast_unquantized

            cast_unquantized(model, torch.bfloat16)  # as `restora train`: the unquantized parts as a bf16 base's
        add_lora(model, LoRAConfig(r=16, alpha=32, target_modules="all"))
        from restora.kernels.attention import training_attention
        from restora.train.loop import _set_attention

        ckpt = name.endswith("-ckpt")
        _set_attention(model, training_attention(model, recompute=not ckpt))  # what restora's trainer does on CPU
        if ckpt:  # as restora train --grad-checkpointing
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if not name.endswith("-eager"):
            from restora.kernels.compiled import compiled_blocks

            compiling = compiled_blocks(model)
            compiling.__enter__()  # for the rest of this process, as during `restora train`
            kept.append(compiling)  # referenced by the step: collecting it would undo the compile
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn(ids, labels, mask):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                s, n = completion_loss(model, ids, labels, mask)
            return s / max(n, 1)
    else:
        from peft import LoraConfig, get_peft_model

        if name == "peft-bnb-nf4":
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            folder = loaded.folder
            del model
            qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")
        else:
            model.to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn(ids, labels, mask):
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    model.train()
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)  # restora's trainer, and transformers' Trainer by default

    def step(batch) -> tuple[int, float]:
        ids, labels, mask = batch
        t0 = time.perf_counter()
        loss = loss_fn(ids, labels, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step.loss = float(loss)
        return int(mask.sum()), time.perf_counter() - t0

    step.kept = kept

    return step, batches


def run_one(name: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    step, batches = build(name)
    t_warm = time.perf_counter()
    for i in range(warmup):
        step(batches[i % len(batches)])
    first_steps = time.perf_counter() - t_warm
    rates = []
    for i in range(warmup, warmup + steps):
        n, dt = step(batches[i % len(batches)])
        rates.append(n / dt)
    return {
        "config": name,
        "tokens_per_s": statistics.median(rates),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_loss": step.loss,
        "first_steps_s": first_steps,
    }


def run_pair(a: str, b: str, rounds: int, threads: int) -> None:
    """`a` and `b` in one process, one step each in turn (which goes first alternates), on the same batch: both
    see the same machine at nearly the same moment, so their ratio survives the drift that moves single runs of
    this machine by up to a third. Prints each one's tokens/s and the median and quartiles of the per-step
    speed ratio b / a."""
    import torch

    torch.set_num_threads(threads)
    built = {name: build(name) for name in (a, b)}
    batches = built[a][1]
    for i in range(len(batches)):  # warm-up: compiles, and oneDNN's per-shape kernels, for both
        for name in (a, b):
            built[name][0](batches[i])
    tokens, seconds, ratios = {a: 0, b: 0}, {a: 0.0, b: 0.0}, []
    for r in range(rounds):
        took = {}
        for name in ((a, b) if r % 2 == 0 else (b, a)):
            n, dt = built[name][0](batches[r % len(batches)])
            tokens[name] += n
            seconds[name] += dt
            took[name] = dt
        ratios.append(took[a] / took[b])
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    for name in (a, b):
        print(f"{name}: {tokens[name] / seconds[name]:.0f} tok/s over {rounds} steps")
    print(f"speed {b} / {a}: median {median:.3f} (quartiles {q1:.3f}-{q3:.3f}) over {rounds} paired steps; "
          f"total tokens/s ratio {seconds[a] / seconds[b]:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--pair", nargs=2, metavar=("A", "B"), help="A and B in one process, alternating steps "
                    "(speed ratio B / A; no peak RSS)")
    ap.add_argument("--rounds", type=int, default=32, help="paired steps with --pair")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.pair:
        if any(name.endswith("-padded") for name in a.pair):
            ap.error("--pair: a -padded configuration switches the padding-free forward off for the whole process")
        run_pair(*a.pair, a.rounds, a.threads)
        return
    if a.one:
        print(json.dumps(run_one(a.one, a.steps, a.warmup, a.threads)))
        return
    results = []
    for name in a.configs:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--threads", str(a.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        line = [x for x in p.stdout.splitlines() if x.startswith("{")]
        if p.returncode or not line:
            err = (p.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name}: failed ({err})", flush=True)
            continue
        results.append(json.loads(line[-1]))
        r = results[-1]
        print(f"{name}: {r['tokens_per_s']:.0f} tok/s, peak RSS {r['peak_rss_gib']:.2f} GiB, first {a.warmup} steps"
              f" {r['first_steps_s']:.1f} s", flush=True)
    by = {r["config"]: r for r in results}
    print("\n| config | tokens/s | peak RSS (GiB) | vs PEFT bf16 (speed / RSS) |")
    print("|---|---|---|---|")
    ref = by.get("peft-bf16")
    for r in results:
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x / {r['peak_rss_gib'] / ref['peak_rss_gib']:.2f}x" if ref else ""
        print(f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
