"""Many adapters in one batch: restora's gathered BGMV forward vs the base alone vs PEFT, in one process.

On SmolLM2-135M a batch of 8 rows (SQL Create Context prompts cut to --tokens tokens) runs
through: (a) the base model alone, (b) restora's MultiAdapterModel with 8 different LoRA
adapters (random init with non-zero B, r=16, all linear layers), one per row, (c) PEFT with the
same 8 adapter folders loaded and `adapter_names=[...]` (its mixed-batch forward). Also restora
with all 8 rows on one adapter (the no-gather path) and with 7 rows on one adapter and one base
row (the gather path on nearly the same work), which shows what sharing an adapter saves.

Two measurements: a prefill forward over the whole prompt, and one decode step (B, 1) over a
KV cache of the prompt (cropped back after every step). bf16 autocast on CPU, 2 threads,
warmup, then --repeats rounds in which every variant runs twice (interleaved, so the load of a
shared machine hits all alike): the first call follows set_rows, so restora gathers the rows'
weights in it (a generation does that once, then reuses them every step); the second is the
steady state. Medians per variant are reported, with the ratio to the base.

    python benchmarks/multi_adapter.py                  # 8 rows x 128 tokens, 7 rounds
    python benchmarks/multi_adapter.py --repeats 11 --tokens 256

The 8 adapter folders are written by restora (save_adapter) to a temporary folder; PEFT loads
the same folders, and the first rows' logits of (b) and (c) are checked to agree.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from restora.adapters import LoRAConfig, adapter_modules, add_lora, remove_adapters, save_adapter
from restora.adapters import BASE, load_adapters
from restora.models.load import load_model

SQL = Path("/work/shared/data/sql_create_context/train.jsonl")


def sql_batch(tokenizer, rows: int, tokens: int) -> torch.Tensor:
    """(rows, tokens) ids: consecutive SQL prompts (table, question, answer) joined and cut to `tokens`."""
    lines = [json.loads(line) for line in SQL.open()][: rows * 40]
    batch, i = [], 0
    for _ in range(rows):
        ids: list[int] = []
        while len(ids) < tokens:
            r = lines[i]
            i += 1
            ids += tokenizer(f"{r['context']}\n-- {r['question']}\n{r['answer']}\n\n")["input_ids"]
        batch.append(ids[:tokens])
    return torch.tensor(batch)


def write_adapters(model: nn.Module, n: int, rank: int, root: Path) -> dict[str, Path]:
    """n random LoRA adapters (A Kaiming, B ~ N(0, 0.01²)) on every linear layer, as restora folders."""
    folders = {}
    for k in range(n):
        torch.manual_seed(k)
        add_lora(model, LoRAConfig(r=rank, alpha=2 * rank, target_modules="all"))
        with torch.no_grad():
            for _, m in adapter_modules(model):
                m.lora_B.weight.normal_(0, 0.01)
        folders[f"a{k}"] = save_adapter(model, root / f"a{k}")
        remove_adapters(model)
    return folders


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    base = loaded.model.eval()
    ids = sql_batch(loaded.tokenizer, args.rows, args.tokens)
    B, T = ids.shape
    mask = torch.ones_like(ids)
    tmp = tempfile.TemporaryDirectory()
    folders = write_adapters(copy.deepcopy(base), args.rows, args.rank, Path(tmp.name))

    restora = copy.deepcopy(base)
    bank = load_adapters(restora, folders)
    mixed = bank.rows(list(folders))  # row b uses adapter a{b}
    models: dict[str, tuple[nn.Module, Callable[[], None], dict]] = {
        "base": (base, lambda: None, {}),
        f"restora mixed ({B} adapters)": (restora, lambda: bank.set_rows(mixed), {}),
        "restora 1 adapter (all rows)": (restora, lambda: bank.set_rows(torch.full((B,), 1)), {}),
        f"restora 1 adapter ({B - 1} rows) + base": (
            restora, lambda: bank.set_rows(torch.tensor([1] * (B - 1) + [BASE])), {}),
    }
    if not args.no_peft:
        from peft import PeftModel

        names = list(folders)
        peft = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[names[0]]), adapter_name=names[0]).eval()
        for name in names[1:]:
            peft.load_adapter(str(folders[name]), adapter_name=name)
        models[f"peft mixed ({B} adapters)"] = (peft, lambda: None, {"adapter_names": names})

    def prefill(name: str) -> Callable[[], object]:
        model, setup, kw = models[name]
        setup()
        return lambda: model(input_ids=ids, attention_mask=mask, use_cache=False, **kw)

    caches = {}
    step_ids, step_mask, step_pos = ids[:, -1:], torch.ones(B, T + 1, dtype=torch.long), torch.full((B, 1), T)

    def decode(name: str) -> Callable[[], object]:
        model, setup, kw = models[name]
        setup()
        if name not in caches:
            caches[name] = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw).past_key_values
        cache = caches[name]

        def step() -> None:
            model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, past_key_values=cache,
                  use_cache=True, **kw)
            cache.crop(-1)  # drop the step's token again
        return step

    if not args.no_peft:  # same adapters, same rows: same logits (in float32, where they should agree closely)
        with torch.no_grad():
            bank.set_rows(mixed[:2])
            ours = restora(input_ids=ids[:2], attention_mask=mask[:2]).logits
            theirs = peft(input_ids=ids[:2], attention_mask=mask[:2], adapter_names=names[:2]).logits
            plain = base(input_ids=ids[:2], attention_mask=mask[:2]).logits
        print(f"float32 logits, rows 0-1: restora vs peft max |diff| {(ours - theirs).abs().max():.3g},"
              f" adapters vs base {(ours - plain).abs().max():.3g}")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        results: dict[str, dict[str, list[float]]] = {"prefill": {}, "decode": {}}
        for phase, make, warm in (("prefill", prefill, 1), ("decode", decode, 3)):
            for name in models:
                fn = make(name)
                for _ in range(warm):
                    fn()
            for _ in range(args.repeats):
                for name in models:
                    fn = make(name)  # set_rows: restora gathers each row's weights on the next forward
                    results[phase].setdefault(f"{name} (first after set_rows)", []).append(timed(fn))
                    results[phase].setdefault(name, []).append(timed(fn))

    print(f"\nSmolLM2-135M, batch {B} x {T} tokens, LoRA r={args.rank} on all linear layers, bf16 autocast,"
          f" {args.threads} threads, median of {args.repeats}")
    print(f"{'variant':<34} {'prefill ms':>11} {'x base':>7} {'decode ms':>10} {'x base':>7}")
    med = {p: {n: statistics.median(v) * 1e3 for n, v in r.items()} for p, r in results.items()}
    for name in models:
        p, d = med["prefill"][name], med["decode"][name]
        print(f"{name:<34} {p:>11.1f} {med['prefill']['base'] / p:>6.2f}x {d:>10.1f} {med['decode']['base'] / d:>6.2f}x")
    print("(x base = base time / variant time: the speed relative to the base alone; each timed call follows an")
    print(" untimed one with the same rows. The first forward after set_rows also gathers the rows' weights:)")
    for name in models:
        if name.startswith("restora"):
            p, d = med["prefill"][f"{name} (first after set_rows)"], med["decode"][f"{name} (first after set_rows)"]
            print(f"  first call after set_rows, {name:<34} prefill {p:8.1f} ms  decode {d:8.1f} ms")
    tmp.cleanup()


if __name__ == "__main__":
    main()
