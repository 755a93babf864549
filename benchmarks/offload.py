"""What offloading costs in tokens/s against the memory it saves (restora.models.offload).

For each base (the bf16 source, and checkpoints restora writes at 8 and 4 bits) greedy decoding runs twice in
fresh processes: with the whole base resident, and offloaded (decoder blocks mapped from the file and paged in one
block at a time). Each process loads the base, decodes a warm-up, then times --tokens new tokens at batch 1 from a
short prompt; peak RSS is the whole process's (/usr/bin/time). The file's pages sit in the page cache (the
machine has the room): offloading re-reads them from memory, not from the disk, so these are its costs on a
machine whose page cache holds the model but whose process budget does not.

    python benchmarks/offload.py --model runs/scale/llama-1b [--tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

RUN = """
import json, sys, time, torch
from restora.infer.generate import greedy_generate
from restora.models.load import load_model
from restora.models.offload import offload
path, paged, tokens = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
loaded = load_model(path, mapped=paged)
if paged:
    offload(loaded.model)
prompt = ["Schema: CREATE TABLE singer (name VARCHAR, age INTEGER)\\nQuestion: How many singers are there?\\nSQL:"]
greedy_generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=2)
t = time.perf_counter()
out = greedy_generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=tokens, stop=())
seconds = time.perf_counter() - t
print("RESULT", json.dumps({"seconds": seconds, "tokens": tokens}))
"""


def measure(path: str, paged: bool, tokens: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", RUN, path, "1" if paged else "0", str(tokens)],
                       env=env, capture_output=True, text=True)
    m = re.search(r"RESULT (.*)", p.stdout)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if p.returncode or not m:
        raise SystemExit(f"{path} (offload={paged}) failed:\n{p.stderr[-3000:]}")
    r = json.loads(m.group(1))
    return {"tokens_per_s": r["tokens"] / r["seconds"], "peak_rss": int(rss.group(1)) * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a float (bf16) Hugging Face folder")
    ap.add_argument("--work", default=None, help="where the 8- and 4-bit checkpoints go (default: beside the model)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work or Path(args.model).parent / "offload")
    bases = {"bf16 (l = 16)": args.model}
    for fmt, bits, name in (("int8", 8, "int8 (l = 8)"), ("rtn", 4, "rtn-4b (l = 4)")):
        out = work / f"{fmt}{bits}"
        if not (out / "restora_manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "restora", "quantize", args.model, "--format", fmt, "--bits",
                            str(bits), "--group-size", "64", "--eval-samples", "0", "--out", str(out)], check=True,
                           env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True)
        bases[name] = str(out)
    print("| base | resident: tokens/s | resident: peak RSS GiB | offloaded: tokens/s | offloaded: peak RSS GiB "
          "| tokens/s ratio | memory saved GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, path in bases.items():
        a = measure(path, False, args.tokens, args.threads)
        b = measure(path, True, args.tokens, args.threads)
        print(f"| {name} | {a['tokens_per_s']:.2f} | {a['peak_rss'] / 2**30:.2f} | {b['tokens_per_s']:.2f} | "
              f"{b['peak_rss'] / 2**30:.2f} | {b['tokens_per_s'] / a['tokens_per_s']:.2f}x | "
              f"{(a['peak_rss'] - b['peak_rss']) / 2**30:.2f} |", flush=True)


if __name__ == "__main__":
    main()
