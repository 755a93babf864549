"""restora's int4 kernel against torch's int4 kernel, over SmolLM2-135M's 210 block layers (4-bit RTN, group 64).

Each layer's input is a fresh (rows, in_features) bf16 matrix; one pass calls every layer once, so the weights
come from memory as in a decoding step (not from cache). Both are called as operators (no restora Python
around them): torch.ops.restora.int4_amx_mm on restora's layout, torch.ops.aten._weight_int4pack_mm_for_cpu on
torch's; and dequantize + GEMM (QuantizedWeight._matmul: the weights dequantized to bf16, then F.linear), what
longer inputs take where the kernel does not serve them. Alternating passes, the median of 7 each; also the
largest error of restora's kernel against the fp32 dequantized weight in fp64, relative to the output's largest
magnitude (bf16 output: ~2^-9).

    python benchmarks/int4_kernel.py [--threads 2] [--rows 1 4 8 16 40 64 256 1024] [--format rtn|nf4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 40, 64, 256, 1024])
    ap.add_argument("--format", default="rtn", choices=["rtn", "nf4"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from restora.kernels import native
    from restora.models.load import load_model
    from restora.kernels import int4 as int4_kernel
    from restora.quant import QuantSpec, quantize_model
    from restora.quant.base import QuantizedWeight

    if not int4_kernel.available():
        raise SystemExit("restora's int4 kernel is not available on this machine (needs AVX-512 BF16 and a C compiler)")
    model = load_model("smollm2-135m").model.eval()
    quantize_model(model, QuantSpec(a.format, 4, 64), progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    for q in layers:
        q.prepare_fast()
    group = 64
    levels = [getattr(q, "code", int4_kernel.UNIFORM_LEVELS) for q in layers]
    torch_layouts = [q._build_gemv() for q in layers] if a.format == "rtn" else None
    amx = int4_kernel.max_rows() == int4_kernel.ANY_ROWS
    print(f"{len(layers)} layers, {a.threads} threads, AMX tiles: {amx}, C++ operator kernels: {native.cpp_kernels()}")
    print("| rows | restora int4 (ms) | torch int4 (ms) | torch / restora | dequantize + GEMM (ms) | max rel. error |")
    print("|---|---|---|---|---|---|")
    for rows in a.rows:
        xs = [torch.randn(rows, q.in_features).to(torch.bfloat16) for q in layers]

        def ours() -> list[torch.Tensor]:
            return [torch.ops.restora.int4_amx_mm(x, q._amx[0], q._amx[1], lv, q.out_features, group)
                    for q, x, lv in zip(layers, xs, levels)]

        def theirs() -> None:
            for q, x, lay in zip(layers, xs, torch_layouts):
                torch.ops.aten._weight_int4pack_mm_for_cpu(x, lay[0], group, lay[1])

        @torch.no_grad()
        def dequantized() -> None:
            for q, x in zip(layers, xs):
                q._matmul(x)

        err = 0.0
        for q, x, y in list(zip(layers, xs, ours()))[:30]:
            ref = x.double() @ q.dequantize(torch.float32).double().T
            err = max(err, float((y.double() - ref).abs().max() / ref.abs().max()))
        runs: dict[str, list[float]] = {"ours": [], "theirs": [], "dq": []}
        for _ in range(7):
            for name, fn in (("ours", ours), ("theirs", theirs if torch_layouts else None), ("dq", dequantized)):
                if fn is None:
                    continue
                t0 = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t0)
        mine, dq = statistics.median(runs["ours"]) * 1e3, statistics.median(runs["dq"]) * 1e3
        if runs["theirs"]:
            other = statistics.median(runs["theirs"]) * 1e3
            print(f"| {rows} | {mine:.2f} | {other:.2f} | {other / mine:.2f}x | {dq:.1f} | {err:.1e} |", flush=True)
        else:
            print(f"| {rows} | {mine:.2f} | (NF4: none) | | {dq:.1f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
