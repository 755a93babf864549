"""Pre-packed bf16 weights for decoding float linear layers on CPU (oneDNN, AMX/AVX512-BF16).

A bf16 `F.linear` on CPU hands oneDNN a plain (out, in) weight on every call, and oneDNN
reorders it into its blocked layout each time: for one token against a 1536 x 576 weight
that reorder costs more than the product itself (measured on this repo's CPU, 2 threads:
60 us per call against 25 us with the weight packed once). Decoding calls every
layer once per token, so `packed_linears` swaps each float base layer for a packed copy
for the duration of a `with`, and restores the original modules afterwards.

The packed copies are kept with their layers (restora.derived: they go when the layer goes) and
reused by the next `with`, as long as the weight and bias are the same tensors, unchanged: packing
SmolLM2's fp32 tied 49152 x 576 head took 80 ms of oneDNN reorder plus its bf16 copy, and keeping
it took a 4-bit model's prompt pass from 0.25 to 0.085 s (2 threads, measured). A weight changed in place (optimizer step, `copy_`, load_state_dict)
moves its version counter and one given a new tensor has a new storage; either repacks. A copy
packed for another batch hint is reused: the hint barely moves the kernel's speed (SmolLM2's
layers at 1, 5 and 8 rows, packed for 1 or for 8: within 17%, measured).
`forget_packed(model)` drops a model's copies.

Only base layers are packed: adapter factors (`lora_A`, `lora_B`, ...) stay as they are, and
so do quantized layers, which bring their own kernels. The packed copy is bf16 and is
extra memory while it lives (half the float weights' size if they are fp32, as large if bf16),
so nothing new is packed when that copy would take more than a quarter of the memory the system
reports available (/proc/meminfo): a model chosen to fit a memory budget keeps fitting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .derived import Derived

__all__ = ["PackedLinear", "can_pack", "forget_packed", "packed_linears"]


def can_pack(device: torch.device) -> bool:
    """oneDNN bf16 packing is available: a CPU with bf16 support in this torch build."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


class PackedLinear(nn.Module):
    """y = x @ W^T + b in bf16 with W packed once into oneDNN's layout (inference only)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().to(torch.bfloat16)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, bf16 packed"


_PACKED: Derived[PackedLinear] = Derived()  # each layer's packed copy, kept while its weight and bias are unchanged


def forget_packed(model: nn.Module) -> int:
    """Drop the kept packed copies of `model`'s layers (frees their memory); returns how many."""
    return _PACKED.forget(model.modules())


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _adapter_part(name: str) -> bool:
    return any(part.startswith(("lora_", "ia3_")) for part in name.split("."))


@contextmanager
def packed_linears(model: nn.Module, batch_hint: int = 1, enabled: bool = True,
                   skip: nn.Module | None = None) -> Iterator[int]:
    """Swap every float base nn.Linear for a PackedLinear during the `with`; yields how many were swapped.

    Linears inside `skip` stay as they are (e.g. the decoder blocks a compiled decode step runs: inductor
    takes packed weights only as frozen constants)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if enabled:
        kept = {id(m) for m in skip.modules()} if skip is not None else set()
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if (type(child) is nn.Linear and child.weight.is_floating_point() and not _adapter_part(full)
                        and id(child) not in kept):
                    swapped.append((module, child_name, child))
        unique = {id(child): child for _, _, child in swapped}  # a module under two parents is packed once
        packed = {key: p for key, child in unique.items()
                  if (p := _PACKED.find(child, (child.weight, child.bias))) is not None}
        fresh = [c for key, c in unique.items() if key not in packed]
        free = _available_bytes()
        if fresh and free is not None and 2 * sum(c.weight.numel() for c in fresh) > free // 4:
            # a new bf16 copy would crowd the memory the model was sized for: those layers decode unpacked
            swapped = [(parent, name, child) for parent, name, child in swapped if id(child) in packed]
        else:
            packed.update({id(c): _PACKED.get(c, (c.weight, c.bias), lambda c=c: PackedLinear(c, batch_hint))
                           for c in fresh})
        for parent, child_name, child in swapped:
            setattr(parent, child_name, packed[id(child)])
    try:
        yield len(swapped)
    finally:
        for parent, child_name, child in swapped:
            setattr(parent, child_name, child)
