"""Symmetric int8 absmax quantization, blockwise or per output row (LLM.int8()'s storage).

    scale = absmax(block) / 127,   q = round(w / scale) in [-127, 127],   w ~ q * scale

Block size -1 means one scale per output row.
"""

from __future__ import annotations

from typing import Any

import torch

from restora.quant.base import QuantizedWeight
from restora.quant.spec import QuantSpec

__all__ = ["Int8Weight"]


class Int8Weight(QuantizedWeight):
    """Buffers: q int8 (out, in); scale fp32 (out, in/blocksize) or (out, 1) per row."""

    format = "int8"
    bits = 8

    def __init__(self, out_features: int, in_features: int, blocksize: int = 64) -> None:
        super().__init__(out_features, in_features)
        if blocksize != -1 and in_features % blocksize:
            raise ValueError(f"block size {blocksize} does not divide in_features {in_features}")
        self.blocksize = blocksize
        groups = 1 if blocksize == -1 else in_features // blocksize
        self.register_buffer("q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(out_features, groups))

    @property
    def _group(self) -> int:
        return self.in_features if self.blocksize == -1 else self.blocksize

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64) -> "Int8Weight":
        out_f, in_f = weight.shape
        q = cls(out_f, in_f, blocksize).to(weight.device)
        step = max(1, (1 << 20) // in_f)  # rows at a time: fp32 temporaries of ~1M weights, not of the whole weight
        for r in range(0, out_f, step):
            w = weight[r : r + step].detach().float().view(-1, in_f // q._group, q._group)  # (rows, groups, group)
            scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
            q.q[r : r + step] = torch.round(w / scale).clamp(-127, 127).view(-1, in_f)
            q.scale[r : r + step] = scale.squeeze(-1)
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.out_features if stop is None else stop
        rows = stop - start
        q = self.q[start:stop].view(rows, -1, self._group).float()  # (rows, groups, group)
        return (q * self.scale[start:stop].unsqueeze(-1)).view(rows, self.in_features).to(dtype)

    def meta(self) -> dict[str, Any]:
        return {"format": "int8", "bits": 8, "group_size": self.blocksize}

    def requantize_spec(self) -> QuantSpec:
        return QuantSpec("int8", 8, self.blocksize)

    @classmethod
    def empty(cls, out_features: int, in_features: int, meta: dict[str, Any]) -> "Int8Weight":
        return cls(out_features, in_features, meta["group_size"])
