"""The one interface every quantization format implements.

A quantized weight is a small frozen type. It stores a float matrix
W of shape (out_features, in_features) in some compact form and offers these verbs:

    quantize   a classmethod building it from a float weight (per format)
    requantize_spec
               the QuantSpec that quantizes a new dense weight into this same format, so
               that folding an adapter into a quantized base is the format's decision
    dequantize W back as a float tensor, optionally only rows [start, stop)
    forward    y = x @ W^T, dequantizing one tile of rows at a time, so that a full
               dequantized copy never exists and autograd saves none (the backward
               pass dequantizes the tiles again, as QLoRA does)
    nbytes     the true storage size of its buffers
    save/load  its buffers are a plain state dict (safetensors-ready) and `meta()`
               is the JSON needed to rebuild an empty instance of the right shape

Formats differ only in how they encode rows; all the tiling lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from restora.quant.spec import QuantSpec

__all__ = ["QuantizedWeight", "TILE_ELEMENTS"]

# Rows are dequantized in tiles of at most this many elements (16 MB in fp32).
TILE_ELEMENTS = 1 << 22


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized tile by tile; the backward redoes the tiles."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: "QuantizedWeight") -> torch.Tensor:
        ctx.qweight = qweight
        return qweight._matmul(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.qweight._matmul_transposed(grad_out), None


def _static(t: torch.Tensor) -> torch.Tensor:
    """A kept layout tensor as compiled graphs should see it: its own storage (a view would make dynamo guard
    its base's sizes too) with static sizes, so the guards a decoding step evaluates are plain C++ tensor checks
    rather than symbolic size relations between layers (SmolLM2, batch 8: ~1,500 such guards, ~1 ms a step)."""
    if t._base is not None:
        t = t.clone()
    torch._dynamo.mark_static(t)
    return t


class QuantizedWeight(nn.Module):
    """Base of all formats: shape bookkeeping, tiled matmul, size, state-dict round trip."""

    format: ClassVar[str] = ""
    bits: int = 16

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features

    # -- what a format must provide -------------------------------------------------
    def dequantize(
        self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Rows [start, stop) of W as a (stop - start, in_features) float tensor."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """JSON-able settings needed (with the shape) to rebuild an empty instance."""
        raise NotImplementedError

    def requantize_spec(self) -> QuantSpec:
        """The spec that quantizes a new dense weight (e.g. W + an adapter's update) into this format."""
        raise NotImplementedError

    @classmethod
    def empty(cls, out_features: int, in_features: int, meta: dict[str, Any]) -> "QuantizedWeight":
        """An instance with correctly shaped, uninitialised buffers (for loading)."""
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------
    def nbytes(self) -> int:
        """True storage: every buffer's bytes, packed codes and scales included."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)

    def _row_tiles(self) -> list[tuple[int, int]]:
        step = max(1, TILE_ELEMENTS // max(1, self.in_features))
        return [(a, min(a + step, self.out_features)) for a in range(0, self.out_features, step)]

    @torch.no_grad()
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        tiles = self._row_tiles()
        if len(tiles) == 1:
            return x @ self.dequantize(x.dtype).T
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for a, b in tiles:
            out[..., a:b] = x @ self.dequantize(x.dtype, a, b).T  # (..., in) @ (in, b-a)
        return out

    @torch.no_grad()
    def _matmul_transposed(self, g: torch.Tensor) -> torch.Tensor:
        """g @ W for g of shape (..., out_features): the gradient w.r.t. the input."""
        out = None
        for a, b in self._row_tiles():
            part = g[..., a:b] @ self.dequantize(g.dtype, a, b)  # (..., b-a) @ (b-a, in)
            out = part if out is None else out.add_(part)
        assert out is not None
        return out

    def _fast_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """A fused kernel for inference, where a format has one (else None). Inside a torch.compile'd graph it
        uses only layouts already built (`prepare_fast`): a layout built while tracing would change what the
        graph's guards saw and cost a recompile (a 4-bit grid unit's compiled training lost ~45 s to that)."""
        return None

    def prepare_fast(self) -> None:
        """Build the layouts `_fast_matmul` keeps, outside any compiled graph (before compiled decoding)."""

    # Runtime layouts of the stored weight that a format's fast path keeps (attribute names, e.g. "_amx"):
    # built on first eager use by `_layout`, dropped when a state dict brings new codes.
    LAYOUTS: ClassVar[tuple[str, ...]] = ()
    # False when the stored weight must stay the only copy (an offloaded model pages it from its file)
    keep_layouts: bool = True

    def _layout(self, name: str, build: Callable[[], Any]) -> Any:
        """The kept layout `name`, built now if missing -- except while torch.compile traces: a layout built
        then would change what the graph's guards saw, so the graph goes without it (None)."""
        if not self.keep_layouts:
            return None
        layout = getattr(self, name, None)
        if layout is None and not torch.compiler.is_compiling():
            layout = torch.utils._pytree.tree_map_only(torch.Tensor, _static, build())
            setattr(self, name, layout)
        return layout

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        for name in self.LAYOUTS:
            setattr(self, name, None)  # new codes: rebuilt on next use
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # e.g. bf16 compute: dequantize straight to it
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantMatmul.apply(x, self)
        y = self._fast_matmul(x)
        return y if y is not None else self._matmul(x)

    def extra_repr(self) -> str:
        m = ", ".join(f"{k}={v}" for k, v in self.meta().items())
        return f"{self.out_features}x{self.in_features}, {m}"
