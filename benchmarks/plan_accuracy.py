"""How close is restora's memory planner (restora.plan.memory) to measured peak RSS on SmolLM2-135M?

Each setting runs in a fresh subprocess (one thread), so settings cannot contaminate each
other. The subprocess builds the model the way restora does (restora.models.bases.build_base,
adapters from restora.adapters), returns freed memory to the OS (gc + malloc_trim), then
resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`) and runs the
workload:

    serve  restora.infer.generate's decoding calls: bf16 autocast, one prefill pass over a
           left-aligned batch of `prompt` random tokens, then `seq - prompt` one-token
           steps with the KV cache; one LoRA adapter (all targets, r 16) on the base
    train  two optimizer steps of restora.train.loop's inner loop: completion_loss under bf16
           autocast, backward, gradient clipping, AdamW step (the second step runs with
           the optimizer states present, i.e. the steady state); every position labelled

Allocator: by default the measured processes run with MALLOC_MMAP_THRESHOLD_=131072, so
glibc gives every tensor above 128 KiB its own mapping and returns it when freed; the
planner estimates live memory, and this makes RSS track it. `--mmap-threshold 0` measures
glibc's dynamic default instead, under which freed activations stay in the heap and training
RSS grows past the live set (see /work/notes/plan_accuracy.md for both).

The measured number is VmHWM after the workload: the peak resident set of the whole
process (Python, torch, transformers, tokenizer, weights and the workload). The process's
lifetime peak (ru_maxrss, which includes building the model) is reported too. The
planner's estimate is `plan_memory(...).total` for the same setting.

    python benchmarks/plan_accuracy.py --out /work/notes/plan_accuracy.md
    python benchmarks/plan_accuracy.py --reuse benchmarks/plan_accuracy.json   # re-score; measure only new settings
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"
SETTINGS: list[dict] = [
    {"name": "serve float", "mode": "serve", "format": "float", "bits": 16, "batch": 8, "seq": 256, "prompt": 128},
    {"name": "serve int8", "mode": "serve", "format": "int8", "bits": 8, "batch": 8, "seq": 256, "prompt": 128},
    {"name": "serve rtn4", "mode": "serve", "format": "rtn", "bits": 4, "batch": 8, "seq": 256, "prompt": 128},
    {"name": "serve rtn2", "mode": "serve", "format": "rtn", "bits": 2, "batch": 8, "seq": 256, "prompt": 128},
    {"name": "train rtn4 mb4", "mode": "train", "format": "rtn", "bits": 4, "batch": 4, "seq": 256, "ckpt": False},
    {"name": "train rtn4 mb4 ckpt", "mode": "train", "format": "rtn", "bits": 4, "batch": 4, "seq": 256, "ckpt": True},
    {"name": "train rtn4 mb8", "mode": "train", "format": "rtn", "bits": 4, "batch": 8, "seq": 256, "ckpt": False},
    {"name": "train rtn4 mb8 ckpt", "mode": "train", "format": "rtn", "bits": 4, "batch": 8, "seq": 256, "ckpt": True},
    {"name": "train float mb4", "mode": "train", "format": "float", "bits": 16, "batch": 4, "seq": 256, "ckpt": False},
    # what `restora train` runs for this model: compiled blocks, restora's training attention (padding-free), no dropout
    {"name": "train float mb8 compiled", "mode": "train", "format": "float", "bits": 16, "batch": 8, "seq": 256,
     "ckpt": False, "compiled": True, "dropout": 0.0},
    {"name": "train rtn4 mb8 compiled", "mode": "train", "format": "rtn", "bits": 4, "batch": 8, "seq": 256,
     "ckpt": False, "compiled": True, "dropout": 0.0},
    {"name": "train rtn4 mb8 ckpt compiled", "mode": "train", "format": "rtn", "bits": 4, "batch": 8, "seq": 256,
     "ckpt": True, "compiled": True, "dropout": 0.0},
]
RANK, TARGETS, DROPOUT = 16, "all", 0.05


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def _settle() -> int:
    """Free what can be freed, reset the peak counter, return the resident set now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status("VmRSS")


def measure_overhead() -> dict:
    """Resident set of the framework alone: imports, model classes and the tokenizer."""
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import restora.adapters  # noqa: F401
    import restora.infer.generate  # noqa: F401
    import restora.train.loop  # noqa: F401
    from restora.models.load import resolve_source

    AutoTokenizer.from_pretrained(str(resolve_source(MODEL)))
    return {"rss": _settle()}


def measure(setting: dict) -> dict:
    """Run one setting in this process; return peak and steady resident bytes."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from restora.adapters import LoRAConfig, add_lora
    from restora.models.bases import BaseChoice, build_base
    from restora.quant.spec import QuantSpec

    spec = QuantSpec(format=setting["format"], bits=setting["bits"], group_size=64)
    loaded = build_base(MODEL, BaseChoice(spec))
    model = loaded.model
    dropout = setting.get("dropout", DROPOUT) if setting["mode"] == "train" else 0.0
    add_lora(model, LoRAConfig(r=RANK, target_modules=TARGETS, dropout=dropout))
    B, T = setting["batch"], setting["seq"]
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    if setting["mode"] == "serve":
        model.eval()
        P = setting["prompt"]
        ids = torch.randint(3, V, (B, P), generator=g)
        mask = torch.ones_like(ids)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        before = _settle()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            cache, nxt, last = res.past_key_values, res.logits[:, -1].argmax(-1), pos[:, -1]
            del res
            for _ in range(T - P):
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
                last = last + 1
                res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                            past_key_values=cache, use_cache=True)
                cache, nxt = res.past_key_values, res.logits[:, -1].argmax(-1)
                del res
        kv = {str(t.dtype) for layer in cache.layers for t in (layer.keys, layer.values)}
        extra = {"kv_dtypes": sorted(kv)}
    else:
        from restora.train.loop import completion_loss

        if setting.get("compiled"):  # as restora.train.loop on CPU: its training attention, then compiled blocks
            from restora.kernels.attention import training_attention
            from restora.kernels.compiled import compiled_blocks
            from restora.train.loop import _set_attention

            _set_attention(model, training_attention(model, recompute=not setting["ckpt"]))
        if setting["ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if setting.get("compiled"):
            compiling = compiled_blocks(model)
            compiling.__enter__()  # for the rest of this process
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4)
        before = _settle()
        for _ in range(2):
            ids = torch.randint(3, V, (B, T), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                s, n = completion_loss(model, ids, ids.clone(), torch.ones_like(ids))
            (s / n).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        extra = {"adapter_params": sum(p.numel() for p in params)}
    return {
        "before": before,
        "peak": _status("VmHWM"),
        "lifetime_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": round(time.perf_counter() - t0, 1),
        **extra,
    }


def estimate(setting: dict) -> object:
    from restora.models.load import resolve_source
    from restora.plan.memory import plan_memory
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(resolve_source(MODEL)))
    common = dict(format=setting["format"], bits=setting["bits"], group_size=64, batch_size=setting["batch"],
                  seq_len=setting["seq"], rank=RANK, targets=TARGETS)
    if setting["mode"] == "serve":
        return plan_memory(config, "serve", adapters=1, prompt_len=setting["prompt"], **common)
    return plan_memory(config, "train", grad_checkpointing=setting["ckpt"], dropout=setting.get("dropout", DROPOUT),
                       compiled=setting.get("compiled", False), **common)


def _subprocess(arg: str, mmap_threshold: int) -> dict:
    env = dict(os.environ)
    if mmap_threshold:  # glibc: tensors above this size get their own mapping, returned to the OS when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run([sys.executable, __file__, "--one", arg], capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        raise RuntimeError(f"setting {arg} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--reuse", help="measurements saved earlier (JSON): score them, measure only settings missing there")
    ap.add_argument("--save", default=str(Path(__file__).with_suffix(".json")), help="where to save measurements")
    ap.add_argument("--score-only", action="store_true", help="with --reuse: measure nothing, score what is saved")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--mmap-threshold", type=int, default=131072,
                    help="MALLOC_MMAP_THRESHOLD_ for the measured processes (0 = glibc's dynamic default)")
    args = ap.parse_args()
    if args.one:
        result = measure_overhead() if args.one == "overhead" else measure(json.loads(args.one))
        print(json.dumps(result))
        return 0
    data = json.loads(Path(args.reuse).read_text()) if args.reuse else {
        "overhead": _subprocess("overhead", args.mmap_threshold), "mmap_threshold": args.mmap_threshold, "settings": []}
    done = {s["name"] for s in data["settings"]}
    for s in SETTINGS:
        if s["name"] not in done and not args.score_only:
            print(f"measuring {s['name']} ...", file=sys.stderr, flush=True)
            data["settings"].append({**s, "measured": _subprocess(json.dumps(s), data["mmap_threshold"])})
            Path(args.save).write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "| setting | measured peak MiB | estimate MiB | error | steady before workload MiB | est. static MiB | lifetime peak MiB | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for s in data["settings"]:
        m, plan = s["measured"], estimate(s)
        err = (plan.total - m["peak"]) / m["peak"]
        errors.append(abs(err))
        lines.append(
            f"| {s['name']} | {_mib(m['peak'])} | {_mib(plan.total)} | {100 * err:+.1f}% | {_mib(m['before'])} "
            f"| {_mib(plan.static)} | {_mib(m['lifetime_peak'])} | {m['seconds']} |"
        )
    lines.append("")
    lines.append(f"MALLOC_MMAP_THRESHOLD_={data['mmap_threshold'] or 'unset (glibc default)'}; "
                 f"framework overhead measured: {_mib(data['overhead']['rss'])} MiB; "
                 f"max |error| {100 * max(errors):.1f}%, mean |error| {100 * sum(errors) / len(errors):.1f}%")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
