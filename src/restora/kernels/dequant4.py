"""4-bit weights to bf16 in one pass (dequant4.c), for the formats' `dequantize` on CPU.

A 4-bit base costs a training step what a bf16 base costs plus dequantizing every block layer's weights,
in the forward and again in the backward; the bf16 matmuls are the same. Compiled, the formats' torch
formulas (unpack, scale, round) become a scalar pass writing the codes as int16 and a second pass scaling
them. This kernel reads the codes once and writes the bf16 weights once, with the same values bit for bit
(dequant4.c's header gives the formulas), behind the operator `restora::dequantize4`, so compiled graphs
call it as one extern kernel.

Used by UniformWeight (4-bit, no act-order) and NF4Weight (NF4 and FP4) when the output is bf16 on CPU and
`fits` says the shape suits it; `available()` is False without AVX-512 F/BW, a C compiler, or with
RESTORA_NATIVE=0, and the formats keep their torch formulas.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from restora.kernels import native

__all__ = ["available", "fits", "dequantize4", "UNIFORM", "TABLE"]

SOURCE = Path(__file__).with_name("dequant4.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mf16c"]
CPU_FLAGS = ("avx512f", "avx512bw", "f16c")
UNIFORM, TABLE = 0, 1  # dequant4.c's modes: w = bf16(-z*s) + q*bf16(s); w = level[q] * absmax


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, FLAGS, CPU_FLAGS, "the 4-bit dequantization kernel")
    if lib is not None:
        p, i = ctypes.c_void_p, ctypes.c_int
        native.bind(lib, "restora_dequant4", [p, p, p, p, p, i, i, i, i, i, i], "restora::dequantize4", _dequantize4)
    return lib


@torch.compiler.assume_constant_result  # a compiled graph takes the answer as given, never traces the build
def available() -> bool:
    """The kernel is built and usable in this process."""
    return _library() is not None


def fits(codes: torch.Tensor, in_features: int, group: int) -> bool:
    """The kernel takes these codes: on CPU, whole 32-input chunks per group, and it is available here."""
    return (codes.device.type == "cpu" and in_features % 32 == 0 and group % 32 == 0 and in_features % group == 0
            and available())


torch.library.define("restora::dequantize4",
                     "(Tensor codes, Tensor a, Tensor b, Tensor levels, int in_features, int group, int mode, "
                     "bool high_first) -> Tensor")


def _check(codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor, in_features: int, group: int, mode: int) -> None:
    rows, groups = codes.shape[0], in_features // group
    want_a = torch.float16 if mode == UNIFORM else torch.float32
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (rows, in_features // 2):
        raise ValueError(f"restora::dequantize4: codes must be uint8 ({rows}, {in_features // 2}), got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    if a.dtype != want_a or a.numel() != rows * groups:
        raise ValueError(f"restora::dequantize4: scales must be {want_a} with {rows * groups} values, got {a.dtype} "
                         f"{tuple(a.shape)}")
    if mode == UNIFORM and (b.dtype != torch.uint8 or b.numel() != rows * groups):
        raise ValueError(f"restora::dequantize4: zeros must be uint8 with {rows * groups} values, got {b.dtype} "
                         f"{tuple(b.shape)}")


def _dequantize4(codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor, levels: torch.Tensor, in_features: int,
                 group: int, mode: int, high_first: bool) -> torch.Tensor:
    lib = _library()
    if lib is None:
        raise RuntimeError("restora::dequantize4: the kernel is not available here (restora.kernels.dequant4."
                           "available() is False)")
    _check(codes, a, b, in_features, group, mode)
    codes, a, b = codes.contiguous(), a.contiguous(), b.contiguous()
    levels = levels.float().contiguous()
    out = torch.empty((codes.shape[0], in_features), dtype=torch.bfloat16)
    lib.restora_dequant4(codes.data_ptr(), a.data_ptr(), b.data_ptr(), levels.data_ptr(), out.data_ptr(),
                         codes.shape[0], in_features, group, mode, int(high_first), torch.get_num_threads())
    return out


@torch.library.register_fake("restora::dequantize4")
def _dequantize4_fake(codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor, levels: torch.Tensor, in_features: int,
                      group: int, mode: int, high_first: bool) -> torch.Tensor:
    return codes.new_empty((codes.shape[0], in_features), dtype=torch.bfloat16)


_NO_LEVELS = torch.zeros(16)
_NO_ZEROS = torch.zeros(0, dtype=torch.uint8)


def dequantize4(codes: torch.Tensor, scales: torch.Tensor, in_features: int, group: int, *,
                zeros: torch.Tensor | None = None, levels: torch.Tensor | None = None,
                high_first: bool = False) -> torch.Tensor:
    """(rows, in_features) bf16 from codes (rows, in_features/2) uint8 and one scale per (row, group):
    uniform with `zeros` (fp16 scales, uint8 zeros), or a code table with `levels` (fp32 absmax as scales)."""
    if (zeros is None) == (levels is None):
        raise ValueError("dequantize4: give zeros (a uniform format) or levels (a code table), not both")
    mode = UNIFORM if zeros is not None else TABLE
    b = zeros if zeros is not None else _NO_ZEROS
    lv = levels if levels is not None else _NO_LEVELS
    return native.call(torch.ops.restora.dequantize4, _dequantize4, codes, scales, b, lv, in_features, group, mode,
                       high_first)
