"""restora at the sizes users fine-tune: Llama-3.2-1B, 3.2-3B and 3.1-8B shapes, stage by stage, peak RSS.

The models have random bf16 weights (vocab 49,152 so SmolLM2's tokenizer fits) and are written shard by shard,
never whole in memory. Their quality numbers mean nothing, so none is reported.

Each stage runs in a fresh process; its peak RSS comes from wait4's rusage, its wall time from the clock:

    quantize-nf4     restora quantize MODEL --format nf4 --eval-samples 0
    quantize-gptq4   restora quantize MODEL --format gptq --bits 4 --calib-samples 16
    train-nf4        restora train MODEL --format nf4 (the given steps, micro-batch and length)
    restore-8        restora restore ADAPTER --bits 8      (int8 base rebuilt by streaming the source)
    restore-16       restora restore ADAPTER --bits 16     (the source dtype: bf16)
    serve            restora serve start-up and one chat completion
    peer-bnb-load    transformers + bitsandbytes load_in_4bit on the CPU
    peer-peft-train  PEFT LoRA on that bitsandbytes model, the same steps

Beside each restora stage, the planner's figure (`restora plan --mode train|serve|quantize`) and
measured / planned.

    python benchmarks/scale.py --shapes 1b [3b 8b] [--stages ...] [--root runs/scale] --out RESULTS.json
    python benchmarks/scale.py --report RESULTS.json [MORE.json ...]     # the markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B, with SmolLM2's vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
VOCAB = 49_152
SHARD_BYTES = 1 << 30
STAGES = ["quantize-nf4", "quantize-gptq4", "train-nf4", "restore-8", "restore-16", "serve", "peer-bnb-load",
          "peer-peft-train"]
GiB = 1 << 30
# one request: the server plans for one resident adapter, a 64-token prompt and 16 new tokens
SERVE_LIMITS = ["--max-loaded-adapters", "1", "--max-prompt-tokens", "64", "--max-tokens-limit", "16"]


def write_model(shape: str, folder: Path) -> Path:
    """A random-weight Llama of `shape` in bf16 safetensors shards (one shard's tensors in memory at a time)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from restora.models.load import resolve_source
    from restora.models.stream import empty_model

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=500000.0, torch_dtype="bfloat16",
                         bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    model = empty_model(config, torch.bfloat16)  # names and shapes only: every parameter on meta
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    g = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    size = total = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, p in model.state_dict().items():
        if name in tied:
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if shard and size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")).save_pretrained(folder)
    return folder


def run_measured(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    """`cmd` under /usr/bin/time -v: peak RSS as the kernel counts it (Maximum resident set size)."""
    t0 = time.perf_counter()
    wrapped = ["/usr/bin/time", "-v", *cmd]
    try:
        p = subprocess.run(wrapped, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, code = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, err, code = str(e.stdout or ""), str(e.stderr or ""), -9
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return {"seconds": time.perf_counter() - t0, "peak_rss": int(m.group(1)) * 1024 if m else None, "code": code,
            "tail": (out + err)[-3000:]}


def run_server(model: Path, work: Path, env: dict[str, str], timeout: float, bits: int = 8) -> dict:
    """`restora serve` start-up and one chat completion with the trained adapter; peak RSS from wait4."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "restora", "serve", str(model), "--adapters-root", str(work), "--bits", str(bits),
           "--memory-budget", "24GiB", "--port", str(port), "--max-batch", "1", *SERVE_LIMITS]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    answer, ready = None, None
    while time.perf_counter() - t0 < timeout and proc.poll() is None:
        try:
            urllib.request.urlopen(base + "/health", timeout=5).read()
            ready = time.perf_counter() - t0
            break
        except OSError:
            time.sleep(2)
    if ready is not None:
        body = json.dumps({"model": "adapter", "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "How many singers are there?"}]}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        try:
            answer = json.loads(urllib.request.urlopen(req, timeout=timeout).read())["choices"][0]["message"]
        except OSError as e:
            answer = {"error": str(e)}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read() if proc.stdout else ""
    ok = ready is not None and isinstance(answer, dict) and "content" in answer
    return {"seconds": time.perf_counter() - t0, "peak_rss": usage.ru_maxrss * 1024, "code": 0 if ok else 1,
            "tail": out[-3000:] + f"\nanswer: {answer}", "ready_seconds": ready,
            "command": " ".join(shlex.quote(c) for c in cmd[2:])}


def plan_figure(model: Path, stage: str, args: argparse.Namespace) -> int | None:
    """The planner's peak for a stage, as `restora plan` computes it (restora.plan.memory.plan_memory)."""
    from transformers import AutoConfig

    from restora.plan.memory import plan_memory
    from restora.plan.choice import compiles, source_dtype

    config = AutoConfig.from_pretrained(model)
    src = source_dtype(config)
    if stage == "quantize-nf4":
        return plan_memory(config, "quantize", format="nf4", bits=4, float_dtype=src, source_dtype=src).total
    if stage == "quantize-gptq4":
        return plan_memory(config, "quantize", format="gptq", bits=4, float_dtype=src, source_dtype=src,
                           calib_tokens=16 * 128).total
    if stage == "train-nf4":
        return plan_memory(config, "train", format="nf4", bits=4, float_dtype="bf16", source_dtype=src,
                           batch_size=args.batch, seq_len=args.seq, targets="attn", dropout=0.0,
                           compiled=compiles("auto", config, "nf4")).total
    if stage == "serve":  # the server's own plan (what it prints at start-up) for SERVE_LIMITS
        from restora.serve.server import serve_plan

        plan, _ = serve_plan(config, "8", None, 24 * GiB, 1, 64 + 16, 1, 16, 64)
        return plan.total
    if stage in ("restore-8", "restore-16"):
        fmt, bits = ("int8", 8) if stage == "restore-8" else ("float", 16)
        return plan_memory(config, "restore", format=fmt, bits=bits, float_dtype=src, source_dtype=src,
                           targets="attn").total
    return None


PEER_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, device_map="cpu", dtype=torch.bfloat16)
print("loaded", sum(p.numel() for p in m.parameters()))
"""

PEER_TRAIN = """
import sys, time, torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, device_map="cpu", dtype=torch.bfloat16)
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
steps, batch, length = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = torch.randint(0, 49152, (batch, length))
for _ in range(steps):
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
    print("step", time.perf_counter() - t, loss.item(), flush=True)
"""


def stages(model: Path, work: Path, args: argparse.Namespace) -> dict[str, tuple[list[str], list[str] | None]]:
    """stage -> (command, plan arguments or None)."""
    py = [sys.executable, "-m", "restora"]
    train = ["--format", "nf4", "--task", "gsm8k", "--batch-size", str(args.batch), "--micro-batch-size",
             str(args.batch), "--max-len", str(args.seq), "--targets", "attn", "--max-steps", str(args.steps),
             "--val-samples", "8", "--max-samples", str(max(8, args.batch * args.steps))]
    adapter = work / "adapter"
    plan_common = [str(model), "--budget", "24GiB", "--targets", "attn", "--float-dtype", "bf16"]
    return {
        "quantize-nf4": ([*py, "quantize", str(model), "--format", "nf4", "--eval-samples", "0", "--out",
                          str(work / "nf4")], [*plan_common, "--mode", "quantize", "--format", "nf4"]),
        "quantize-gptq4": ([*py, "quantize", str(model), "--format", "gptq", "--bits", "4", "--calib-samples", "16",
                            "--calib-max-len", "128", "--eval-samples", "0", "--out", str(work / "gptq4")],
                           [*plan_common, "--mode", "quantize", "--format", "gptq", "--calib-samples", "16",
                            "--seq-len", "128"]),
        "train-nf4": ([*py, "train", str(model), *train, "--out", str(adapter)],
                      [*plan_common, "--mode", "train", "--format", "nf4", "--batch-size", str(args.batch),
                       "--seq-len", str(args.seq)]),
        "restore-8": ([*py, "restore", str(adapter), "--model", str(model), "--bits", "8", "--out",
                       str(work / "plr8")], None),
        "restore-16": ([*py, "restore", str(adapter), "--model", str(model), "--bits", "16", "--out",
                        str(work / "plr16")], None),
        "peer-bnb-load": ([sys.executable, "-c", PEER_LOAD, str(model)], None),
        "peer-peft-train": ([sys.executable, "-c", PEER_TRAIN, str(model), str(args.steps), str(args.batch),
                             str(args.seq)], None),
    }


def fmt(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def report(paths: list[str], root: str | None = None) -> str:
    """The markdown table of result files (later files replace earlier rows of the same shape and stage); with
    `root` (where the models are), each row's planner figure is recomputed by the current planner."""
    rows: dict[tuple[str, str], dict] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text()):
            rows[(r["shape"], r["stage"])] = r
    if root:
        for (shape, stage), r in rows.items():
            batch = r.get("batch", 1 if shape == "8b" else 8)
            r["planned"] = plan_figure(Path(root) / f"llama-{shape}", stage,
                                       argparse.Namespace(batch=batch, seq=r.get("seq", 128), steps=1))
    order = {s: i for i, s in enumerate(STAGES)}
    lines = ["| shape | stage | peak RSS (GiB) | planner (GiB) | measured / planned | wall (s) |",
             "|---|---|---|---|---|---|"]
    for (shape, stage), r in sorted(rows.items(), key=lambda kv: (list(SHAPES).index(kv[0][0]), order[kv[0][1]])):
        planned = r.get("planned")
        ratio = f"{r['peak_rss'] / planned:.2f}" if planned and r.get("peak_rss") else "–"
        ok = "" if r.get("code", 0) == 0 else " (failed)"
        lines.append(f"| {shape} | {stage}{ok} | {fmt(r.get('peak_rss'))} | {fmt(planned) if planned else '–'} | "
                     f"{ratio} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1b"], choices=list(SHAPES))
    ap.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    ap.add_argument("--root", default="runs/scale", help="where the models and outputs go (gitignored)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--report", nargs="+", default=None, help="print the markdown table of these result files")
    ap.add_argument("--replan", action="store_true", help="with --report: planner figures from the current planner")
    args = ap.parse_args()
    if args.report:
        print(report(args.report, args.root if args.replan else None))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    results = []
    for shape in args.shapes:
        t0 = time.perf_counter()
        model = write_model(shape, Path(args.root) / f"llama-{shape}")
        print(f"# {shape}: model at {model} ({time.perf_counter() - t0:.0f} s)", flush=True)
        work = Path(args.root) / f"work-{shape}"
        work.mkdir(parents=True, exist_ok=True)
        table = stages(model, work, args)
        for stage in args.stages:
            if stage == "serve":
                r = run_server(model, work, env, args.timeout)
                planned = plan_figure(model, stage, args)
                results.append({"shape": shape, "stage": stage, **r, "planned": planned})
                ratio = f"{r['peak_rss'] / planned:.2f}" if planned else "-"
                print(f"| {shape} | serve | {fmt(r['peak_rss'])} | {fmt(planned)} | {ratio} | {r['seconds']:.0f} | "
                      f"{'ok' if r['code'] == 0 else 'FAILED'} |", flush=True)
                if r["code"]:
                    print(r["tail"], file=sys.stderr, flush=True)
                continue
            cmd, plan_args = table[stage]
            if "--out" in cmd:
                shutil.rmtree(cmd[cmd.index("--out") + 1], ignore_errors=True)  # each run starts from nothing
            r = run_measured(cmd, env, args.timeout)
            planned = plan_figure(model, stage, args)
            row = {"shape": shape, "stage": stage, **r, "planned": planned, "batch": args.batch, "seq": args.seq,
                   "command": " ".join(shlex.quote(c) for c in cmd[2:] if "\n" not in c)}
            results.append(row)
            ratio = f"{r['peak_rss'] / planned:.2f}" if planned and r["peak_rss"] else "-"
            status = "ok" if r["code"] == 0 else f"FAILED ({r['code']})"
            print(f"| {shape} | {stage} | {fmt(r['peak_rss'])} | {fmt(planned)} | {ratio} | {r['seconds']:.0f} | "
                  f"{status} |", flush=True)
            if r["code"] != 0:
                print(r["tail"], file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
