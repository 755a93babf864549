"""NF4 and FP4 with blockwise absmax and double quantization (QLoRA, Dettmers et al. 2023).

Each block of `blocksize` consecutive weights (row-major) is scaled by its absmax into
[-1, 1], and each value is replaced by the index of the nearest of 16 code values:

    NF4: quantiles of N(0, 1), asymmetric so that 0 is exact, normalised to [-1, 1]
    FP4: sign + 2 exponent bits + 1 mantissa bit, normalised to [-1, 1]

"Nearest" means bucketising by the midpoints of the sorted code table, and two codes
share a byte, the first in the high nibble. This is bitsandbytes' layout, bit for bit,
so our codes and absmax equal `bitsandbytes.functional.quantize_4bit`'s.

Double quantization stores the fp32 absmax constants themselves in 8 bits: subtract
their mean, then quantize blockwise (blocks of 256) with the signed 8-bit dynamic map
(Dettmers 2016), each value to its nearest code. The 4-bit codes, the second-level
scales and the mean equal bitsandbytes' exactly; for about 0.2% of the 8-bit absmax codes
bitsandbytes' approximate binary search (BinSearch "Direct2") picks the neighbour one
step away, where ours is strictly nearer (tests/test_nf4.py checks both facts). The overhead falls from 32/64 = 0.5 to 8/64 + 32/(64*256) ~ 0.127 bits
per weight.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from restora.kernels import dequant4, int4
from restora.quant.base import QuantizedWeight
from restora.quant.packing import interleave
from restora.quant.spec import QuantSpec

__all__ = ["NF4_CODE", "FP4_CODE", "dynamic_map", "quantize_blockwise", "NF4Weight"]

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (e2m1, bias 2) in bit-pattern order: code i has sign bit i >> 3.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODE = tuple(v / 12.0 for v in _FP4_RAW)

DQ_BLOCKSIZE = 256


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    values = {"nf4": NF4_CODE, "fp4": FP4_CODE}[quant_type]
    return torch.tensor(values, dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def dynamic_map() -> tuple[float, ...]:
    """The signed 8-bit dynamic quantization map, sorted (256 values in [-1, 1]).

    For exponent e = 0..6 the fraction takes 2^e + 1 evenly spaced boundaries in
    [0.1, 1]; the code values are their midpoints times 10^(e - 6), with both signs.
    Zero and 1.0 complete the 256 values.
    """
    values: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist()
        values += (-(10 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    values.sort()
    values[0] = -1.0  # the range must reach -1 for the search below (bitsandbytes does the same)
    return tuple(values)


# The map as a tensor, made once: compiled graphs (training on a double-quantized base) read it as a constant
# rather than tracing dynamic_map, whose tolist() dynamo cannot trace.
_DQ_CODE = torch.tensor(dynamic_map())


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into `code` of the nearest value, ties to the lower (bitsandbytes' rule)."""
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2  # midpoints of the sorted table
    return order[torch.bucketize(scaled, bounds)]


def _nearest_sorted(normed: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into a sorted `code`: the left neighbour, or the right one if strictly closer."""
    idx = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, code.numel() - 1)
    right = (idx + 1).clamp(max=code.numel() - 1)
    closer = (normed - code[right]).abs() < (normed - code[idx]).abs()
    return torch.where(closer, right, idx)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization (for the absmax constants) with bitsandbytes' CPU rule:
    divide by the block absmax, then take the nearest code value."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n))
    absmax = padded.view(nblocks, blocksize).abs().max(dim=1).values  # padding is 0: harmless
    normed = padded.view(nblocks, blocksize) / absmax.unsqueeze(1)
    idx = _nearest_sorted(normed.reshape(-1)[:n], code)
    return idx.to(torch.uint8), absmax


CHUNK_BLOCKS = 16384  # blocks quantized at once: bounds the fp32 / int64 temporaries (~30 B a weight) to ~30 MB


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat blockwise absmax quantization of `x` to indices into `code` (any tail block).

    Blocks are independent, so they are quantized CHUNK_BLOCKS at a time: the same codes, without temporaries the
    size of the whole weight (a 58M-weight layer would otherwise need ~1.6 GB for a moment)."""
    flat = x.reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    idx = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    for b0 in range(0, nblocks, CHUNK_BLOCKS):
        b1 = min(nblocks, b0 + CHUNK_BLOCKS)
        lo, hi = b0 * blocksize, min(n, b1 * blocksize)
        idx[lo:hi], absmax[b0:b1] = _quantize_blocks(flat[lo:hi].float(), code, blocksize)
    return idx, absmax


def _quantize_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_blockwise of one fp32 run of whole blocks (the last may be a tail)."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n))
    blocks = padded.view(nblocks, blocksize)  # (nblocks, blocksize)
    absmax = blocks.abs().max(dim=1).values
    if n % blocksize:  # the tail block's absmax ignores the padding (it is |0| anyway)
        absmax[-1] = flat[(nblocks - 1) * blocksize :].abs().max()
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
    idx = _nearest(scaled.reshape(-1)[:n], code)
    return idx.to(torch.uint8), absmax


def dequantize_blockwise(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = idx.numel()
    vals = code[idx.long()]
    nblocks = absmax.numel()
    padded = torch.nn.functional.pad(vals, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    return (padded * absmax.unsqueeze(1)).reshape(-1)[:n]


class NF4Weight(QuantizedWeight):
    """A 4-bit NormalFloat (or FP4) weight with blockwise absmax, optionally double quantized.

    Buffers:
        codes         uint8 (out, in/2)   two 4-bit codes per byte, first in the high nibble
        absmax        fp32  (nblocks,)     without double quantization, or
        absmax_codes  uint8 (nblocks,)     with it, plus absmax_scale fp32 (nblocks/256,)
        absmax_offset fp32  ()             and the subtracted mean
    """

    format = "nf4"
    bits = 4

    def __init__(
        self,
        out_features: int,
        in_features: int,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
    ) -> None:
        super().__init__(out_features, in_features)
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be nf4 or fp4, got {quant_type!r}")
        if in_features % blocksize:
            raise ValueError(f"block size {blocksize} does not divide in_features {in_features}")
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        nblocks = out_features * in_features // blocksize
        self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(nblocks, dtype=torch.uint8))
            self.register_buffer("absmax_scale", torch.zeros(-(-nblocks // DQ_BLOCKSIZE)))
            self.register_buffer("absmax_offset", torch.zeros(()))
        else:
            self.register_buffer("absmax", torch.zeros(nblocks))
        self.register_buffer("code", _code(quant_type, torch.device("cpu")), persistent=False)

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
    ) -> "NF4Weight":
        out_f, in_f = weight.shape
        q = cls(out_f, in_f, quant_type, blocksize, double_quant).to(weight.device)
        idx, absmax = quantize_blockwise(weight.detach(), q.code, blocksize)
        idx = idx.view(out_f, in_f // 2, 2)  # (out, in/2, 2): pairs share a byte
        q.codes.copy_((idx[..., 0] << 4) | idx[..., 1])
        if double_quant:
            offset = absmax.mean()
            dq_code = _DQ_CODE.to(weight.device)
            a_idx, a_scale = quantize_blockwise_8bit(absmax - offset, dq_code, DQ_BLOCKSIZE)
            q.absmax_codes.copy_(a_idx)
            q.absmax_scale.copy_(a_scale)
            q.absmax_offset.copy_(offset)
        else:
            q.absmax.copy_(absmax)
        return q

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax per block (decoded from 8 bits when double quantized)."""
        if not self.double_quant:
            return self.absmax
        dq_code = _DQ_CODE.to(self.codes.device)
        return dequantize_blockwise(self.absmax_codes, self.absmax_scale, dq_code, DQ_BLOCKSIZE) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.out_features if stop is None else stop
        packed = self.codes[start:stop]  # (rows, in/2)
        per_row = self.in_features // self.blocksize
        if dtype == torch.bfloat16 and dequant4.fits(packed, self.in_features, self.blocksize):  # same values, one pass
            absmax = self.block_absmax()[start * per_row : stop * per_row]
            return dequant4.dequantize4(packed, absmax, self.in_features, self.blocksize, levels=self.code,
                                        high_first=True)
        idx = interleave([packed >> 4, packed & 0xF]).long()  # (rows, in): high nibble first, as bitsandbytes
        vals = self.code.to(packed.device)[idx].view(stop - start, -1, self.blocksize)  # (rows, blocks/row, bs)
        absmax = self.block_absmax()[start * per_row : stop * per_row].view(stop - start, per_row, 1)
        return (vals * absmax).view(stop - start, self.in_features).to(dtype)

    # Inference fast path: restora's AMX int4 kernel (int4.py) with the code table as its levels, for
    # bf16 inputs on CPU, any number of rows; otherwise every call dequantizes the whole weight. Its layout of
    # the codes (as large as the codes, plus fp32 absmax) is kept by QuantizedWeight._layout.
    LAYOUTS = ("_amx",)

    def _fast_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.device.type != "cpu" or x.dtype != torch.bfloat16 or not self._amx_fits():
            return None
        if torch.compiler.is_compiling() and getattr(self, "_amx", None) is None:
            return None  # a graph uses only layouts built before it (compiled training): no guard on the rows
        if x.numel() // self.in_features > int4.max_rows():
            return None
        layout = self._layout("_amx", self._build_amx)
        return None if layout is None else int4.linear(x, layout, self.out_features, self.blocksize, self.code)

    def _amx_fits(self) -> bool:
        return (self.codes.device.type == "cpu" and int4.available()
                and int4.supports_shape(self.out_features, self.in_features, self.blocksize))

    @torch.no_grad()
    def _build_amx(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", enabled=False):
            idx = interleave([self.codes >> 4, self.codes & 0xF]).reshape(self.out_features, self.in_features)
            absmax = self.block_absmax().reshape(self.out_features, -1)  # (out, blocks per row)
            return int4.pack(idx, absmax, None, self.blocksize)

    def prepare_fast(self) -> None:
        if self._amx_fits():
            self._layout("_amx", self._build_amx)

    def meta(self) -> dict[str, Any]:
        return {
            "format": self.quant_type,
            "bits": 4,
            "group_size": self.blocksize,
            "double_quant": self.double_quant,
        }

    def requantize_spec(self) -> QuantSpec:
        return QuantSpec(self.quant_type, 4, self.blocksize, double_quant=self.double_quant)

    @classmethod
    def empty(cls, out_features: int, in_features: int, meta: dict[str, Any]) -> "NF4Weight":
        return cls(out_features, in_features, meta["format"], meta["group_size"], meta["double_quant"])
