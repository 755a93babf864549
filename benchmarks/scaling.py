"""Scaling out: `restora train` on 1 rank vs 2 ranks under torchrun (DDP and FSDP), SmolLM2-135M.

Every configuration trains the same LoRA (r16, all linear layers) on the same SQL rows
with the same global batch for the same number of optimizer steps, in fresh processes:

    1 rank x 1 thread      plain `restora train`, OMP_NUM_THREADS=1 (the reference)
    1 rank x 2 threads     the same with two intra-op threads (what one process makes of 2 cores)
    2 ranks ddp            torchrun --nproc-per-node 2, one thread per rank, --parallel ddp
    2 ranks fsdp           the same with --parallel fsdp (base and adapter sharded, FSDP2)

The micro-batch is half the global batch, so a rank's forward pass has the same shape in
every configuration. Tokens/s counts every input token of the global batch (prompt
included) over optimizer steps 2..N, read from the run's metrics.jsonl (step 1 carries
start-up: FSDP's lazy init, first allocations). Scaling efficiency = tokens/s of the
configuration / (2 x tokens/s of 1 rank x 1 thread).

    python benchmarks/scaling.py [--max-steps 4] [--batch-size 8] [--format float] [--bits 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = ["1 rank x 1 thread", "1 rank x 2 threads", "2 ranks ddp", "2 ranks fsdp"]


def command(name: str, train_args: list[str], out: Path, port: int) -> tuple[list[str], dict[str, str]]:
    threads = "2" if name == "1 rank x 2 threads" else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
    if name.startswith("1 rank"):
        return [sys.executable, "-m", "restora.cli", "train", *train_args, "--out", str(out)], env
    parallel = name.split()[-1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "restora.cli", "train", *train_args, "--parallel", parallel, "--out", str(out)]
    return cmd, env


def steady_rate(metrics: Path) -> tuple[float, int]:
    """Tokens/s over steps 2..N, from the cumulative tokens and rate of each step's record."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    elapsed = [r["tokens"] / r["tokens_per_s"] for r in recs]  # seconds since training started
    return (recs[-1]["tokens"] - recs[0]["tokens"]) / (elapsed[-1] - elapsed[0]), recs[-1]["tokens"] // len(recs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--format", default="float")
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--port", type=int, default=29571)
    a = ap.parse_args()
    if a.max_steps < 2:
        ap.error("--max-steps must be at least 2 (step 1 is start-up)")
    train_args = [a.model, "--task", "sql", "--format", a.format, "--bits", str(a.bits), "--group-size", "64",
                  "--max-steps", str(a.max_steps), "--batch-size", str(a.batch_size),
                  "--micro-batch-size", str(a.batch_size // 2), "--max-samples", str(8 * a.batch_size),
                  "--val-samples", "0", "--max-len", "256"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="restora-scaling-") as tmp:
        for i, name in enumerate(a.configs):
            out = Path(tmp) / f"run{i}"
            cmd, env = command(name, train_args, out, a.port + i)
            threads = env["OMP_NUM_THREADS"]
            shown = ["torchrun" if c == "torch.distributed.run" else c for c in cmd[2:]]  # drop "python -m"
            shown = ["restora", *shown[1:]] if shown[0] == "restora.cli" else shown
            print(f"$ OMP_NUM_THREADS={threads} {shlex.join(shown)}", flush=True)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if p.returncode or not (out / "metrics.jsonl").is_file():
                err = (p.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{name}: failed ({err})", flush=True)
                continue
            rate, per_step = steady_rate(out / "metrics.jsonl")
            rows.append((name, rate, per_step))
            print(f"{name}: {rate:.0f} tokens/s ({per_step} tokens per step)", flush=True)
    ref = next((r for n, r, _ in rows if n == "1 rank x 1 thread"), None)
    print(f"\n{a.model}, {a.format} base, global batch {a.batch_size} SQL rows, micro-batch {a.batch_size // 2},"
          f" tokens/s over steps 2..{a.max_steps}")
    print("\n| configuration | tokens/s | scaling efficiency (tok/s / (2 x 1-rank tok/s)) |")
    print("|---|---|---|")
    for name, rate, _ in rows:
        eff = "" if ref is None or name == "1 rank x 1 thread" else f"{rate / (2 * ref):.2f}"
        print(f"| {name} | {rate:.0f} | {eff} |")


if __name__ == "__main__":
    main()
