"""Dequantizing SmolLM2-135M's 210 block layers to bf16: restora's kernel against the torch formulas and bitsandbytes.

What a 4-bit base's training step pays beyond a bf16 base's is this pass over every weight (compiled blocks keep
its output for the backward). One pass dequantizes all 210 layers once, each to a fresh bf16 tensor:

    restora kernel     QuantizedWeight.dequantize(bf16): restora::dequantize4 (restora.kernels.dequant4)
    torch, compiled    the formats' torch formulas under torch.compile, as compiled training ran them before
                       the kernel (and still does where it cannot run)
    torch, eager       the same formulas op by op
    bitsandbytes       bitsandbytes.functional.dequantize_4bit on the same weights quantized by bitsandbytes
                       (NF4, blocksize 64; its CPU backend), where it is installed

Alternating passes, the median of 9 each. Every pass's restora output is compared bit for bit with the torch
formulas' once.

    python benchmarks/dequant4.py [--threads 2] [--formats rtn nf4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", nargs="+", default=["rtn", "nf4"], choices=["rtn", "nf4"])
    ap.add_argument("--passes", type=int, default=9)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from restora.models.load import load_model
    from restora.kernels import dequant4
    from restora.quant import QuantSpec, quantize_model
    from restora.quant.base import QuantizedWeight

    if not dequant4.available():
        raise SystemExit("restora's dequantization kernel is not available here (needs AVX-512 F/BW and a C compiler)")
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        bnb = None
    torch_formula = dequant4.fits
    never = lambda *args: False  # noqa: E731  (one object: the compiled graph's guard on it holds)

    def use_kernel(on: bool) -> None:
        dequant4.fits = torch_formula if on else never

    print(f"{'format':<6} {'restora (ms)':>12} {'torch compiled':>15} {'torch eager':>12} {'bitsandbytes':>13}   "
          "compiled / restora, bitsandbytes / restora")
    for fmt in a.formats:
        model = load_model("smollm2-135m").model.eval()
        weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        quantize_model(model, QuantSpec(fmt, 4, 64), progress=False)
        layers = [m for m in model.modules() if isinstance(m, QuantizedWeight)]

        def one_pass() -> list[torch.Tensor]:
            return [q.dequantize(torch.bfloat16) for q in layers]

        compiled = torch.compile(one_pass)
        use_kernel(False)
        reference = compiled()
        use_kernel(True)
        mismatched = sum(not torch.equal(x.view(torch.int16), r.view(torch.int16)) for x, r in zip(one_pass(), reference))
        runs = {"restora": lambda: one_pass(), "torch compiled": lambda: compiled(), "torch eager": lambda: one_pass()}
        if bnb is not None and fmt == "nf4":
            quantized = [bnb.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type="nf4")
                         for n, w in weights.items() if "layers." in n]
            runs["bitsandbytes"] = lambda: [bnb.dequantize_4bit(p, s) for p, s in quantized]
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.passes + 1):  # the first is a warm-up
            for name, run in runs.items():
                use_kernel(name == "restora")
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        use_kernel(True)
        ms = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
        bb = f"{ms['bitsandbytes']:.1f}" if "bitsandbytes" in ms else "-"
        ratio = f", {ms['bitsandbytes'] / ms['restora']:.1f}x" if "bitsandbytes" in ms else ""
        print(f"{fmt:<6} {ms['restora']:>12.1f} {ms['torch compiled']:>15.1f} {ms['torch eager']:>12.1f} {bb:>13}   "
              f"{ms['torch compiled'] / ms['restora']:.1f}x{ratio}   ({len(layers)} layers; "
              f"{mismatched} differ from the torch formulas in any bit)")


if __name__ == "__main__":
    main()
