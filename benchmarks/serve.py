"""restora serve under load: 8 distinct adapters in one continuous batch vs the same load on the base.

The server (`restora.serve.server.serve`, SmolLM2-135M, float base, bf16 autocast) runs in a
subprocess; this process is the load generator: C closed-loop clients (threads, plain HTTP),
each sending R completions of SQL Create Context prompts with max_tokens N and `ignore_eos`
(so every request generates exactly N tokens and both loads do the same work). Two loads:

    (a) adapters: client i always asks for adapter i (8 LoRA r=16 adapters on all linear layers,
        random non-zero B, written by restora's save_adapter), so each decode step mixes 8 adapters
    (b) base: the same clients and prompts, every request on the base

Rounds alternate a, b, a, b (a shared machine's load hits both alike); reported per load:
generated tokens/s (total completion tokens / wall time of the round, median over rounds) and
p50 / p99 request latency (all rounds). Goal: (a) >= 0.8x of (b). For reference,
PEFT's mixed batch of 8 adapters measured 43 tok/s here, 0.30x of its base (benchmarks/multi_adapter.py).

    python benchmarks/serve.py                          # 8 clients x 4 requests x 64 tokens, 2 rounds
    python benchmarks/serve.py --requests 8 --rounds 3 --out /work/notes/serve_benchmark.md
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SQL = Path(os.environ.get("RESTORA_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))) / "sql_create_context" / "train.jsonl"


def write_adapters(n: int, rank: int, root: Path) -> list[str]:
    import torch

    from restora.adapters import LoRAConfig, adapter_modules, add_lora, save_adapter
    from restora.models.load import load_model

    loaded = load_model("smollm2-135m")
    names = []
    for i in range(n):
        model = copy.deepcopy(loaded.model)
        torch.manual_seed(1000 + i)
        add_lora(model, LoRAConfig(r=rank, alpha=2 * rank, target_modules="all"))
        with torch.no_grad():
            for _, m in adapter_modules(model):
                m.lora_B.weight.normal_(0, 0.02)  # non-zero B: the adapter really changes outputs
        save_adapter(model, root / f"sql{i}", provenance={"source_hash": loaded.source_hash})
        names.append(f"sql{i}")
    return names


def prompts(n: int) -> list[str]:
    rows = [json.loads(line) for _, line in zip(range(n), SQL.open())] if SQL.is_file() else []
    texts = [f"{r['context']}\n-- {r['question']}\nSELECT" for r in rows]
    return texts or [f"Question {i}: how many rows are in table t{i}?\nSELECT" for i in range(n)]


def post(port: int, body: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {out}")
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]


def run_load(port: int, models: list[str], texts: list[str], requests: int, tokens: int) -> tuple[float, list[float]]:
    """Each client c sends `requests` completions for models[c], one after another."""

    def client(c: int) -> list[tuple[float, int]]:
        return [post(port, {"model": models[c], "prompt": texts[(c * requests + k) % len(texts)], "max_tokens": tokens,
                            "temperature": 0, "ignore_eos": True}) for k in range(requests)]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(models)) as pool:
        results = [r for rs in pool.map(client, range(len(models))) for r in rs]
    wall = time.perf_counter() - t0
    return sum(n for _, n in results) / wall, [s for s, _ in results]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="per client per round")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens (ignore_eos: exactly this many)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="decode in fp32 (the server's bf16=False)")
    ap.add_argument("--out", default=None, help="append the markdown table here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    names = write_adapters(args.clients, args.rank, root)
    port = args.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    kw = dict(adapters_root=str(root), bits="16", memory_budget="16GiB", port=port, max_batch=args.clients,
              max_loaded_adapters=args.clients, bf16=not args.fp32)
    code = f"import sys; from restora.commands.serving import serve; sys.exit(serve('smollm2-135m', **{kw!r}))"
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                health = json.loads(conn.getresponse().read())
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > end:
                    raise RuntimeError((root / "server.log").read_text()) from None
                time.sleep(0.5)
        texts = prompts(args.clients * args.requests)
        loads = {"8 distinct adapters": names, "base only": ["smollm2-135m"] * args.clients}
        for models in loads.values():  # warm-up: loads every adapter, first prefill/decode
            run_load(port, models, texts, 1, 4)
        tps: dict[str, list[float]] = {k: [] for k in loads}
        lat: dict[str, list[float]] = {k: [] for k in loads}
        for r in range(args.rounds):
            for k, models in loads.items():
                t, ls = run_load(port, models, texts, args.requests, args.tokens)
                tps[k].append(t)
                lat[k] += ls
                print(f"round {r + 1}: {k:<20} {t:7.1f} tok/s  p50 {pct(ls, .5):6.2f} s")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        log.close()
        tmp.cleanup()

    base = statistics.median(tps["base only"])
    cmd = "python benchmarks/serve.py " + " ".join(sys.argv[1:])
    lines = [
        f"SmolLM2-135M float base ({'fp32' if args.fp32 else 'bf16 autocast'}), restora serve, {args.clients} closed-loop clients x "
        f"{args.requests} requests x {args.tokens} tokens per round, {args.rounds} rounds, LoRA r={args.rank} on all "
        f"linear layers, server torch threads {os.environ.get('OMP_NUM_THREADS', os.cpu_count())} (OMP_NUM_THREADS); base format {health['base']['format']} "
        f"{health['base']['bits']}-bit.",
        "",
        "| load | tokens/s (median) | p50 latency (s) | p99 latency (s) | vs base |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in loads:
        t = statistics.median(tps[k])
        lines.append(f"| {k} | {t:.1f} | {pct(lat[k], .5):.2f} | {pct(lat[k], .99):.2f} | {t / base:.2f}x |")
    lines.append("| PEFT mixed batch of 8 (a separate measurement, another setup: not this run) | 43 | | | 0.30x |")
    lines += ["", f"Command: `{cmd}`"]
    table = "\n".join(lines)
    print("\n" + table)
    ratio = statistics.median(tps["8 distinct adapters"]) / base
    print(f"\nratio adapters / base: {ratio:.2f}x (goal >= 0.8x)")
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    main()
