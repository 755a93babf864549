"""Uniform k-bit weights with an asymmetric scale and zero point per group.

One storage type serves both round-to-nearest (RTN) and GPTQ: they differ only in how
the integer codes are chosen, not in what the codes mean. For a group
of `group_size` inputs of one output row,

    scale = (max - min) / (2^k - 1),   zero = round(-min / scale)
    q     = clamp(round(w / scale) + zero, 0, 2^k - 1)
    w    ~ (q - zero) * scale

Scales are stored in fp16 (as GPTQ checkpoints do) and the codes are chosen with the
fp16-rounded scale, so quantize and dequantize agree exactly. Codes are bit-packed
(see packing.py): 3 bits cost 3 bits. With GPTQ's act-order the group of input column
j is `g_idx[j]` instead of j // group_size.
"""

from __future__ import annotations

from typing import Any

import torch

from restora.kernels import dequant4, int4
from restora.quant.base import QuantizedWeight
from restora.quant.packing import pack_codes, unpack_codes
from restora.quant.spec import QuantSpec

__all__ = ["chunk_rows", "UniformWeight", "uniform_params", "quantize_with", "rtn_quantize"]


CHUNK_WEIGHTS = 1 << 20  # weights quantized or packed at once (their fp32 / int64 temporaries: ~10-20 MB)


def chunk_rows(in_features: int) -> int:
    """Rows of an (out, in) weight per chunk of about CHUNK_WEIGHTS weights."""
    return max(1, CHUNK_WEIGHTS // in_features)


def uniform_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable) and integer zero point for the last dim of `w`."""
    maxq = 2**bits - 1
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of `w` on the grid (scale, zero), broadcast over the last dim."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


class UniformWeight(QuantizedWeight):
    """Buffers: qweight uint8 (out, in*k/8) packed codes; scales fp16 (out, groups);
    zeros uint8 (out, groups); g_idx int32 (in,) only with act-order."""

    format = "rtn"

    def __init__(
        self,
        out_features: int,
        in_features: int,
        bits: int,
        group_size: int = 64,
        method: str = "rtn",
        act_order: bool = False,
    ) -> None:
        super().__init__(out_features, in_features)
        if group_size != -1 and in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.bits = bits
        self.group_size = group_size
        self.method = method
        self.act_order = act_order
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        if act_order:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))

    @property
    def _group(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        method: str = "rtn",
        g_idx: torch.Tensor | None = None,
    ) -> "UniformWeight":
        """Pack integer codes (out, in) with per-group scales/zeros (out, groups)."""
        out_f, in_f = codes.shape
        q = cls(out_f, in_f, bits, group_size, method, act_order=g_idx is not None).to(codes.device)
        step = chunk_rows(in_f)
        for r in range(0, out_f, step):  # rows pack independently; chunks bound 3-bit packing's int64 temporaries
            q.qweight[r : r + step] = pack_codes(codes[r : r + step].to(torch.uint8), bits)
        q.scales.copy_(scales.half())
        q.zeros.copy_(zeros.to(torch.uint8))
        if g_idx is not None:
            q.g_idx.copy_(g_idx.to(torch.int32))
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.out_features if stop is None else stop
        rows = stop - start
        if (dtype == torch.bfloat16 and self.bits == 4 and not self.act_order
                and dequant4.fits(self.qweight, self.in_features, self._group)):  # the same values, one pass
            return dequant4.dequantize4(self.qweight[start:stop], self.scales[start:stop], self.in_features,
                                        self._group, zeros=self.zeros[start:stop])
        codes = unpack_codes(self.qweight[start:stop], self.bits, self.in_features)  # (rows, in) uint8
        scales = self.scales[start:stop].float()
        zeros = self.zeros[start:stop].float()
        if self.act_order:
            g = self.g_idx.long()
            return ((codes.float() - zeros[:, g]) * scales[:, g]).to(dtype)
        codes = codes.view(rows, -1, self._group)  # (rows, groups, group)
        # exact in fp32 (k-bit codes, fp16 scales), so a bf16/fp16 result is the nearest one to the format's weight,
        # as dequant4 and compiled graphs give it (a bf16 addcmul of bf16-rounded terms was up to 1 ulp off)
        w = (codes.float() - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)
        return w.view(rows, self.in_features).to(dtype)

    # Inference fast paths for 4-bit codes and bf16 inputs on CPU, each keeping its own layout of the codes
    # (QuantizedWeight._layout: built on first eager use or by prepare_fast, and kept; the size of the codes,
    # plus scales). One of them per layer:
    # - restora's int4 kernel (int4.py) wherever it runs (AVX-512 BF16), for as many rows as it takes
    #   (`max_rows`: any with AMX; up to VEC_MAX_ROWS without), prompts included: with AMX its cost barely grows
    #   (SmolLM2-135M's block layers, 2 threads: 5.6 ms for 2 rows, 6.2 for 8, 76 for 640, against 8.4, 10.6
    #   and -- dequantize + matmul -- 234 before), and its vector path matches torch's one-row kernel;
    # - elsewhere torch's int4 GEMV kernel (w = (q - 8)·s + m per group, so m = (8 - zero)·s) for up to
    #   FAST_ROWS rows (it loses to dequantize + GEMM on long prompts, measured).
    FAST_ROWS = 64

    def _fast_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.bits != 4 or self.act_order or x.device.type != "cpu" or x.dtype != torch.bfloat16:
            return None
        kernel = self._amx_fits()
        if kernel and torch.compiler.is_compiling() and getattr(self, "_amx", None) is None:
            return None  # a graph uses only layouts built before it (compiled training): no guard on the rows
        rows = x.numel() // self.in_features
        if kernel and rows <= int4.max_rows():
            layout = self._layout("_amx", self._build_amx)
            return None if layout is None else int4.linear(x, layout, self.out_features, self._group)
        if kernel or rows > self.FAST_ROWS or not self._gemv_fits():
            return None
        layout = self._layout("_int4pack", self._build_gemv)
        if layout is None:
            return None
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), layout[0], self._group, layout[1])
        return y.reshape(*x.shape[:-1], self.out_features)

    def _amx_fits(self) -> bool:
        return (self.bits == 4 and not self.act_order and self.qweight.device.type == "cpu" and int4.available()
                and int4.supports_shape(self.out_features, self.in_features, self._group))

    def _gemv_fits(self) -> bool:
        return (self.bits == 4 and not self.act_order and self.qweight.device.type == "cpu"
                and self._group in (32, 64, 128, 256) and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))

    LAYOUTS = ("_amx", "_int4pack")

    @torch.no_grad()
    def _build_amx(self) -> tuple[torch.Tensor, torch.Tensor]:
        codes = unpack_codes(self.qweight, 4, self.in_features)  # (out, in)
        return int4.pack(codes, self.scales, self.zeros, self._group)

    @torch.no_grad()
    def _build_gemv(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", enabled=False):
            codes = unpack_codes(self.qweight, 4, self.in_features).to(torch.int32)  # (out, in)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            s, z = self.scales.float(), self.zeros.float()  # (out, groups)
            sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (groups, out, 2)
        return packed, sz

    def prepare_fast(self) -> None:
        if self._amx_fits():
            self._layout("_amx", self._build_amx)
        elif self._gemv_fits():
            self._layout("_int4pack", self._build_gemv)

    def meta(self) -> dict[str, Any]:
        return {
            "format": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "act_order": self.act_order,
        }

    def requantize_spec(self) -> QuantSpec:
        """RTN on the same grid settings, GPTQ weights included: GPTQ needs the calibration data this
        weight was made from, which a merge does not have."""
        return QuantSpec("rtn", self.bits, self.group_size)

    @classmethod
    def empty(cls, out_features: int, in_features: int, meta: dict[str, Any]) -> "UniformWeight":
        return cls(
            out_features, in_features, meta["bits"], meta["group_size"], meta["format"], meta.get("act_order", False)
        )


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = 64) -> UniformWeight:
    """Round-to-nearest: each group's own min/max grid, every weight to its nearest level."""
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(out_f, in_f // g, device=weight.device)
    zero = torch.empty(out_f, in_f // g, device=weight.device)
    step = chunk_rows(in_f)
    for r in range(0, out_f, step):  # rows are independent: fp32 temporaries of a chunk, not of the whole weight
        w = weight[r : r + step].detach().float().view(-1, in_f // g, g)  # (rows, groups, group)
        scale[r : r + step], zero[r : r + step] = uniform_params(w, bits)  # (rows, groups)
        codes[r : r + step] = quantize_with(w, scale[r : r + step].unsqueeze(-1), zero[r : r + step].unsqueeze(-1),
                                            bits).view(-1, in_f)
    return UniformWeight.from_codes(codes, scale, zero, bits, group_size, "rtn")
