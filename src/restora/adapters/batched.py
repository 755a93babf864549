"""Many adapters in one batch over one base: each row names its adapter (Punica's BGMV idea,
Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", arXiv:2310.18547; S-LoRA, arXiv:2311.03285).

Every adapted layer keeps all loaded adapters stacked in slots, zero-padded to the layer's
largest rank r_max (zero rows of A and zero columns of B add exactly nothing):

    A_allᵀ (S, in, r_max)   s·B_allᵀ (S, r_max, out)   scaling (S,)   l_in (S, in)   l_out (S, out)

Slot 0 is the base ("no adapter"): zero A/B, (IA)³ vectors of ones. Row b of a batch with
slot i_b computes, for every adapter kind at once,

    y_b = l_out[i_b] ⊙ base(l_in[i_b] ⊙ x_b) + s[i_b] · B[i_b] A[i_b] x_b

A LoRA adapter has l = 1; an (IA)³ adapter has A = B = 0 and scales the input (feedforward
modules, e.g. down_proj) or the output (k, v), as IA3Linear. The LoRA term is two batched
matmuls over weights gathered by row, torch.bmm then torch.baddbmm, with no Python loop
over adapters. The gathered (and scaled, and cast) weights are cached until the rows or the
adapters change, so each decode step costs two small matmuls per layer. On CPU those run in
fp32 when a row has few tokens (decode): with bf16 autocast a (8, 1, 576) x (8, 576, 16) bmm
then (8, 1, 16) x (8, 16, 1536) takes ~180 us in bf16 (no fast small-batch kernel) and ~50 us
in fp32, against ~280 us for the base matmul; for prefill-sized rows bf16 wins (1.2 ms vs 3.2 ms
at 128 tokens), so it stays in the autocast dtype there. When every row uses
the same slot the gather is skipped and one plain (B·T, in) matmul serves all rows (the
"segment" case; benchmarks/multi_adapter.py measures both).

`MultiLoRALinear` wraps its base like LoRALinear and only ever calls it, so any restora base
format works and `swap_base` (PLR) is one assignment. `set_rows(model, ids)` is the callback
`restora.infer.generate.greedy_generate` takes; ids are slots, and `BASE` (0) means the base
alone. Layers an adapter does not target hold zeros for it. Which adapter holds which slot is
restora.adapters.multi's `MultiAdapterModel` (a server's load / unload / LRU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from restora.quant.linear import linear_shape

from restora.adapters.lora import swap_base_of

__all__ = ["BASE", "MultiLoRALinear", "set_rows"]

BASE = 0  # the slot of "no adapter"
_SMALL_T = 16  # tokens per row up to which the adapter term runs in fp32 on CPU (decode steps)


class MultiLoRALinear(nn.Module):
    """base_layer with every loaded adapter stacked in slots; row b of the input uses slot rows[b]."""

    # Its forward branches in Python on the current rows (one adapter for all, or a gather), which changes
    # between decoding steps: compiled decoding keeps dynamo's guards on it (restora.infer.decode._compiled_step).
    NEEDS_GUARDS = True

    def __init__(self, base_layer: nn.Module, num_slots: int = 1) -> None:
        super().__init__()
        out_features, in_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        w = next(iter([*base_layer.parameters(), *base_layer.buffers()]), None)  # QuantLinear has buffers only
        kw: dict[str, Any] = {"device": w.device if w is not None else None}
        # Runtime state, not checkpoints: adapters live in their folders (persistent=False).
        # Stored in the layout the forward multiplies with, so gathering rows is one index copy:
        self.register_buffer("lora_At", torch.zeros(num_slots, in_features, 0, **kw), persistent=False)  # (S, in, r): Aᵀ
        self.register_buffer("lora_Bt", torch.zeros(num_slots, 0, out_features, **kw), persistent=False)  # (S, r, out): s·Bᵀ
        self.register_buffer("scaling", torch.zeros(num_slots, **kw), persistent=False)  # (S,)
        self.register_buffer("ia3_in", None, persistent=False)  # (S, in) or None when no (IA)³ adapter scales inputs
        self.register_buffer("ia3_out", None, persistent=False)  # (S, out) or None
        self.ranks: dict[int, int] = {}  # slot -> LoRA rank
        self.ia3_slots: dict[int, str] = {}  # slot -> "ia3_in" | "ia3_out"
        self.adapter_enabled = True
        self.merged = False  # never: rows use different adapters, so there is nothing to merge
        self.rows: torch.Tensor | None = None  # (B,) slot of each batch row
        self._cache: dict[torch.dtype, dict[str, Any]] | None = None  # per compute dtype

    @property
    def num_slots(self) -> int:
        return self.scaling.shape[0]

    @property
    def rank(self) -> int:
        """r_max: the stacks' rank (0 when no LoRA adapter uses this layer)."""
        return self.lora_At.shape[2]

    @property
    def used_slots(self) -> set[int]:
        return set(self.ranks) | set(self.ia3_slots)

    # -- slots --------------------------------------------------------------------------------
    @torch.no_grad()
    def grow(self, num_slots: int) -> None:
        """Make room for `num_slots` slots (new ones are empty)."""
        extra = num_slots - self.num_slots
        if extra <= 0:
            return
        pad = lambda t, fill: torch.cat([t, t.new_full((extra, *t.shape[1:]), fill)])  # noqa: E731
        self.lora_At, self.lora_Bt, self.scaling = pad(self.lora_At, 0.0), pad(self.lora_Bt, 0.0), pad(self.scaling, 0.0)
        if self.ia3_in is not None:
            self.ia3_in = pad(self.ia3_in, 1.0)
        if self.ia3_out is not None:
            self.ia3_out = pad(self.ia3_out, 1.0)
        self._cache = None

    @torch.no_grad()
    def _resize_rank(self, r_max: int) -> None:
        r = self.rank
        if r_max > r:  # zero-pad: exact
            self.lora_At = torch.cat([self.lora_At, self.lora_At.new_zeros(self.num_slots, self.in_features, r_max - r)], 2)
            self.lora_Bt = torch.cat([self.lora_Bt, self.lora_Bt.new_zeros(self.num_slots, r_max - r, self.out_features)], 1)
        elif r_max < r:  # every slot beyond r_max is zero there
            self.lora_At, self.lora_Bt = self.lora_At[:, :, :r_max].contiguous(), self.lora_Bt[:, :r_max].contiguous()

    @torch.no_grad()
    def set_lora(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Put a LoRA update s·B A (A: (r, in), B: (out, r)) into `slot`."""
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(
                f"LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a layer of (out, in)"
                f" {(self.out_features, self.in_features)}"
            )
        self.clear(slot)
        self._resize_rank(max(r, self.rank))
        self.lora_At[slot, :, :r] = A.T.to(self.lora_At.dtype)
        self.lora_Bt[slot, :r] = (B.to(self.lora_Bt.dtype) * scaling).T
        self.scaling[slot] = scaling
        self.ranks[slot] = r
        self._cache = None

    @torch.no_grad()
    def set_ia3(self, slot: int, vector: torch.Tensor, feedforward: bool) -> None:
        """Put an (IA)³ vector into `slot`: it scales the input (feedforward) or the output."""
        size = self.in_features if feedforward else self.out_features
        vector = vector.reshape(-1)
        if vector.shape[0] != size:
            raise ValueError(f"(IA)³ vector has {vector.shape[0]} entries, the layer needs {size}")
        self.clear(slot)
        attr = "ia3_in" if feedforward else "ia3_out"
        if getattr(self, attr) is None:
            setattr(self, attr, self.scaling.new_ones(self.num_slots, size))
        getattr(self, attr)[slot] = vector.to(self.scaling.dtype)
        self.ia3_slots[slot] = attr
        self._cache = None

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Empty `slot`; shrink r_max and drop unused (IA)³ stacks so no work is wasted on them."""
        self.lora_At[slot].zero_()
        self.lora_Bt[slot].zero_()
        self.scaling[slot] = 0.0
        self.ranks.pop(slot, None)
        self._resize_rank(max(self.ranks.values(), default=0))
        attr = self.ia3_slots.pop(slot, None)
        if attr is not None:
            getattr(self, attr)[slot] = 1.0
            if attr not in self.ia3_slots.values():
                setattr(self, attr, None)
        self._cache = None

    def set_rows(self, rows: torch.Tensor) -> None:
        """The slot of each row of the next batches: (B,) integers in [0, num_slots)."""
        self.rows = rows
        self._cache = None

    # -- forward --------------------------------------------------------------------------------
    def _gathered(self, dtype: torch.dtype) -> dict[str, Any]:
        """Per-row weights for the current rows, scaled and cast once (until rows or slots change)."""
        if self._cache is None:
            self._cache = {}
        c = self._cache.get(dtype)
        if c is not None:
            return c
        rows = self.rows
        assert rows is not None
        uniform = bool((rows == rows[0]).all())
        c = {"dtype": dtype, "r": self.rank, "uniform": uniform}
        if c["r"] > 0:
            if uniform:  # one adapter for all rows: one plain matmul over all tokens (views, no copy in fp32)
                i = int(rows[0])
                c["At"], c["Bt"] = self.lora_At[i].to(dtype), self.lora_Bt[i].to(dtype)  # (in, r), (r, out)
            else:  # one index copy per stack (and a cast for bf16)
                c["At"], c["Bt"] = self.lora_At[rows].to(dtype), self.lora_Bt[rows].to(dtype)  # (B, in, r), (B, r, out)
        c["l_in"] = None if self.ia3_in is None else self.ia3_in[rows][:, None, :]  # (B, 1, in), float
        c["l_out"] = None if self.ia3_out is None else self.ia3_out[rows][:, None, :]  # (B, 1, out)
        self._cache[dtype] = c
        return c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base_layer(x)
        if self.rows is None or self.rows.shape[0] != x.shape[0]:
            have = "no rows" if self.rows is None else f"rows for {self.rows.shape[0]} rows"
            raise ValueError(f"MultiLoRALinear has {have}, the batch has {x.shape[0]}: call set_rows(model, ids) first")
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        B = x.shape[0]
        x3 = x.reshape(B, -1, self.in_features)  # (B, T, in)
        # The adapter term's own dtype: on CPU, bf16/fp16 matmuls with a handful of rows (decode
        # steps) have no fast kernel; fp32 is ~4x faster there (see the module docstring).
        lora_dtype = torch.float32 if device == "cpu" and x3.shape[1] <= _SMALL_T and dtype.itemsize < 4 else dtype
        c = self._gathered(lora_dtype)
        if c["l_in"] is not None:  # exact for the other rows: their l is 1
            x3 = (x3 * c["l_in"]).to(x.dtype)
        # Cast once for the base and the adapters: the base's autocast would cast x the same way.
        xc = x3.to(dtype)
        y = self.base_layer(xc)  # (B, T, out)
        if c["l_out"] is not None:
            y = (y * c["l_out"]).to(y.dtype)
        if c["r"] > 0:
            with torch.autocast(device, enabled=False):  # operands are already in lora_dtype: autocast would recast
                xl = xc if lora_dtype == dtype else x3.to(lora_dtype)
                # Accumulate into the base's fresh output in place (no (B, T, out) temporary) unless autograd needs it.
                y = self._add_lora_term(c, xl, y, inplace=y.dtype == lora_dtype and not y.requires_grad)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _add_lora_term(self, c: dict[str, Any], x3: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
        """y + s · B A x for every row with its own slot's weights, x3 (B, T, in) and y (B, T, out)."""
        if c["uniform"]:  # every row on one adapter: plain 2-D matmuls
            y2 = y.reshape(-1, self.out_features)  # (B·T, out)
            xa = x3.reshape(-1, self.in_features) @ c["At"]  # (B·T, r)
            y2 = y2.addmm_(xa, c["Bt"]) if inplace else y2 + (xa @ c["Bt"]).to(y.dtype)
            return y2.view(y.shape)
        xa = torch.bmm(x3, c["At"])  # (B, T, r)
        return y.baddbmm_(xa, c["Bt"]) if inplace else y + torch.bmm(xa, c["Bt"]).to(y.dtype)

    # -- the adapter interface (AdapterModule) ------------------------------------------------
    def adapter_params(self) -> list[nn.Parameter]:
        return []  # serving only: the stacks are buffers

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        raise ValueError("a multi-adapter layer holds many adapters: save each one from its own model")

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise ValueError("a multi-adapter layer loads adapters by name: use MultiAdapterModel.add_adapter")

    def merge(self) -> None:
        raise ValueError("cannot merge a multi-adapter layer: rows use different adapters")

    def unmerge(self) -> None:
        return None  # never merged

    def swap_base(self, new_base: nn.Module) -> nn.Module:
        """Put `new_base` under every adapter of this layer (PLR's restore step); returns the old base."""
        return swap_base_of(self, new_base, "multi-adapter layer")

    def extra_repr(self) -> str:
        ia3 = [a for a in ("ia3_in", "ia3_out") if getattr(self, a) is not None]
        return f"slots={self.num_slots}, r_max={self.rank}" + (f", {'+'.join(ia3)}" if ia3 else "")


def set_rows(model: nn.Module, ids: torch.Tensor | Sequence[int]) -> None:
    """Give every multi-adapter layer of `model` the slot of each batch row (BASE = 0: no adapter).

    This is the `set_rows` callback of restora.infer.generate.greedy_generate.
    """
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    rows = torch.as_tensor(ids, dtype=torch.long)
    if rows.dim() != 1 or rows.numel() == 0:
        raise ValueError(f"row ids must be a non-empty 1-D sequence, got shape {tuple(rows.shape)}")
    for layer in layers:
        if int(rows.min()) < 0 or int(rows.max()) >= layer.num_slots:
            raise ValueError(f"row ids {rows.tolist()} out of range: slots are 0 (base) .. {layer.num_slots - 1}")
        layer.set_rows(rows.to(layer.scaling.device))
