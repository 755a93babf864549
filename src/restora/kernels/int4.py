"""restora's native 4-bit matmul: y = x @ W^T straight from the codes, for bf16 activations on CPU.

torch's own int4 kernel (`_weight_int4pack_mm_for_cpu`) runs one row of x at a time on AVX-512, so its
cost grows with the rows: SmolLM2-135M's 210 block layers took 3.6 ms for one row, 11.4 ms for 8 rows and
48 ms for 40 (2 threads, weights cold in cache, an AMX machine). Batched decoding and speculative decoding
(which verifies several draft tokens a row) feed 8-40 rows per step. This kernel (int4_amx.c) has two paths
over one layout of the codes:

- tiles (Intel AMX): each 32-input chunk of codes is widened once into a 1 KB bf16 tile buffer and multiplied
  with up to 16 rows at a time, so more rows cost little: 4.2, 5.2 and 13.8 ms for the three row counts above.
- vectors (AVX-512 BF16, e.g. AMD Zen 4/5 too): 16 outputs per register, the widened codes multiplied with
  each row's broadcast input pairs by vdpbf16ps, no tile buffer and no horizontal sums. It serves up to 4
  rows on AMX machines (a mostly empty tile costs more) and up to VEC_MAX_ROWS rows where there is no AMX.
  Same 210 layers on a 2-core AMD EPYC without AMX, both called as operators, against torch's kernel on
  its own layout: 3.3 against 3.3 ms for 1 row, 3.7 against 4.2 for 4, 4.7 against 6.8 for 8, 7.6
  against 12.3 for 16, 15.0 against 28.2 for 40 (`python benchmarks/int4_kernel.py`).

Up to 64 rows both compute w = (q - zero) * scale exactly as restora's uniform format defines it (fp16
scales, integer zeros, fp32 accumulation), with no bf16 rounding of the weights. NF4 and FP4 weights use
the same kernel with their 16 code values as the levels (w = level[q] * absmax): there the levels are
rounded to bf16 (relative error at most 2^-9, as for bf16 dequantized weights). Longer inputs (prompts)
on the tile path get each weight tile dequantized once per call to bf16, as a dequantize + GEMM would: 640
rows through those layers took 76 ms, against 93 ms for a bf16 F.linear on the dequantized weights and 146 ms
with the exact per-group scaling. The vector path stays exact for any number of rows; without AMX, inputs of
more than VEC_MAX_ROWS rows take dequantize + GEMM. The output is bf16.

Training does not use it: its forward over about 1,200 rows per micro-batch ran no faster than the
compiled dequantize + GEMM it would replace (677 against 712 tokens/s, benchmarks/train_step.py's rtn4
configuration with the kernel patched in, one run each).

The kernel is C, built on first use with the system C compiler (the same one torch.compile's inductor
needs) into a per-user cache, and called behind the op `restora::int4_amx_mm` (C++ kernel, restora.kernels.native),
so torch.compile'd graphs can call it too. `available()` is False when the CPU lacks AVX-512 BF16, there is
no compiler, the build fails, or RESTORA_NATIVE=0; the formats then take their earlier paths (uniform:
torch's int4 kernel up to 64 rows; otherwise dequantize + GEMM). `max_rows()` says how many rows it takes.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from restora.kernels import native

__all__ = ["available", "pack", "int4_amx_mm", "linear", "supports_shape"]

SOURCE = Path(__file__).with_name("int4_amx.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile",
         "-mamx-bf16"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")  # the vector path; the tile path needs AMX_FLAGS too
AMX_FLAGS = ("amx_tile", "amx_bf16")
ANY_ROWS = 1 << 62
# Without AMX, the most rows a call sends down the vector path: its cost grows with the rows, dequantize + GEMM's
# mostly does not. SmolLM2-135M's 210 layers, 2 threads, AMD EPYC (benchmarks/int4_kernel.py, with
# restora.kernels.dequant4 dequantizing): RTN4 21 / 40 / 59 / 77 / 184 ms for 64 / 128 / 192 / 256 / 512 rows
# against 33 / 48 / 62 / 77 / 134 for dequantize + bf16 GEMM; NF4 at 128 / 256 rows 46 / 89 against 47 / 76.
# They cross near 200 rows.
VEC_MAX_ROWS = 192


@functools.cache
def _library() -> tuple[ctypes.CDLL, bool] | None:
    """The loaded kernel and whether its tile (AMX) path is on: off where the CPU lacks AMX or the OS refuses
    its tile state (an old kernel, a seccomp policy), and the vector path then serves up to VEC_MAX_ROWS rows."""
    lib = native.load(SOURCE, FLAGS, CPU_FLAGS, "the int4 kernel")
    if lib is None:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.int4_amx_init.argtypes = [i]
    amx = bool(lib.int4_amx_init(int(set(AMX_FLAGS) <= native.cpu_flags())))
    native.bind(lib, "int4_amx_gemm", [p, p, p, p, p, i, i, i, i, i], "restora::int4_amx_mm", _int4_amx_mm)
    return lib, amx


@torch.compiler.assume_constant_result  # a compiled graph takes the answer as given, never traces the build
def available() -> bool:
    """The int4 kernel is built and usable in this process (AVX-512 BF16; `max_rows` says for how many rows)."""
    return _library() is not None


@torch.compiler.assume_constant_result
def max_rows() -> int:
    """The most rows of x the formats send to the kernel: any with the tile path (AMX), VEC_MAX_ROWS with the
    vector path only (longer inputs run faster as dequantize + GEMM there), 0 where the kernel is not available.
    The kernel itself takes any number of rows on either path."""
    loaded = _library()
    return 0 if loaded is None else ANY_ROWS if loaded[1] else VEC_MAX_ROWS


def supports_shape(out_features: int, in_features: int, group: int) -> bool:
    """The kernel's layout needs whole 16-output tiles and groups of whole 32-input chunks."""
    return out_features % 16 == 0 and group % 32 == 0 and in_features % group == 0


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int) -> tuple[torch.Tensor,
                                                                                                         torch.Tensor]:
    """codes (N, K) in [0, 15], scales and zeros (N, K/group) (no zeros: 0) -> (packed codes, scales and zeros)
    in the kernel's layout (int4_amx.c): N*K/2 bytes, and (N/16, K/group, 2, 16) fp32."""
    N, K = codes.shape
    if not supports_shape(N, K, group):
        raise ValueError(f"int4 AMX layout needs out % 16 == 0 and group % 32 == 0, got ({N}, {K}) group {group}")
    with torch.no_grad(), torch.autocast(codes.device.type, enabled=False):  # may run inside a decoding autocast
        c = codes.to(torch.uint8).reshape(N // 16, 16, K // 4, 2, 2)  # tile, j, quad, low/high half, e
        packed = (c[..., 0, :] | (c[..., 1, :] << 4)).permute(0, 2, 1, 3).contiguous()  # (tile, quad, j, e)
        scales = scales.float()
        sz = torch.stack([scales, torch.zeros_like(scales) if zeros is None else zeros.float()], dim=1)  # (N, 2, groups)
        sz = sz.reshape(N // 16, 16, 2, K // group).permute(0, 3, 2, 1).contiguous()  # (tile, group, 2, 16)
    return packed.reshape(-1), sz


torch.library.define("restora::int4_amx_mm",
                     "(Tensor x, Tensor packed, Tensor scales_zeros, Tensor levels, int out_features, int group) -> Tensor")
UNIFORM_LEVELS = torch.arange(16, dtype=torch.float32)  # a uniform format's code q stands for q


def _int4_amx_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, levels: torch.Tensor,
                 out_features: int, group: int) -> torch.Tensor:
    loaded = _library()
    if loaded is None:
        raise RuntimeError("restora::int4_amx_mm: the int4 kernel is not available here (restora.quant."
                           "int4_kernel.available() is False)")
    x = x.contiguous()
    M, K = x.shape
    y = torch.empty((M, out_features), dtype=torch.bfloat16)
    levels = levels.float().contiguous()
    rc = loaded[0].int4_amx_gemm(x.data_ptr(), packed.data_ptr(), scales_zeros.data_ptr(), levels.data_ptr(),
                                 y.data_ptr(), M, out_features, K, group, torch.get_num_threads())
    if rc:
        raise MemoryError(f"restora::int4_amx_mm: no memory for the widened codes or row sums of a ({out_features}, "
                          f"{K}) layer")
    return y


@torch.library.register_fake("restora::int4_amx_mm")
def _int4_amx_mm_fake(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, levels: torch.Tensor,
                      out_features: int, group: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features), dtype=torch.bfloat16)


def int4_amx_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, group: int,
                levels: torch.Tensor = UNIFORM_LEVELS) -> torch.Tensor:
    """y (M, out_features) bf16 = x (M, K) bf16 @ W^T, W packed by `pack`; `levels` (16,) are what the codes
    stand for (0..15 for uniform formats, the code table for NF4/FP4)."""
    return native.call(torch.ops.restora.int4_amx_mm, _int4_amx_mm, x, packed, scales_zeros, levels, out_features,
                       group)


def linear(x: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor], out_features: int, group: int,
           levels: torch.Tensor = UNIFORM_LEVELS) -> torch.Tensor:
    """x (..., K) bf16 @ W^T for a layer whose codes `pack` laid out: (..., out_features) bf16."""
    y = int4_amx_mm(x.reshape(-1, x.shape[-1]), *layout, out_features, group, levels)
    return y.reshape(*x.shape[:-1], out_features)
