"""Pre-packed bf16 weights for decoding float linear layers on CPU (oneDNN, AMX/AVX512-BF16).

A bf16 `F.linear` on CPU hands oneDNN a plain (out, in) weight on every call, and oneDNN
reorders it into its blocked layout each time: for one token against a 1536 x 576 weight
that reorder costs more than the product itself (measured on this repo's CPU, 2 threads:
60 us per call against 25 us with the weight packed once). Decoding calls every
layer once per token, so `packed_linears` swaps each float base layer for a packed copy
for the duration of a `with`, and restores the original modules afterwards.

The packed copies are kept with their layers (restora.kernels.derived: they go when the layer goes) and
reused by the next `with`, as long as the weight and bias are the same tensors, unchanged: packing
SmolLM2's fp32 tied 49152 x 576 head took 80 ms of oneDNN reorder plus its bf16 copy, and keeping
it took a 4-bit model's prompt pass from 0.25 to 0.085 s (2 threads, measured). A weight changed in place (optimizer step, `copy_`, load_state_dict)
moves its version counter and one given a new tensor has a new storage; either repacks. A copy
packed for another batch hint is reused: the hint barely moves the kernel's speed (SmolLM2's
layers at 1, 5 and 8 rows, packed for 1 or for 8: within 17%, measured).
`forget_packed(model)` drops a model's copies.

Compiled decoding steps (restora.infer.decode, compile=True) run the packed copies too. Inductor cannot take
oneDNN's opaque packed tensor as a graph input, so inside a compiled graph a PackedLinear calls the op
`restora::packed_linear(x, weight, bias)` with the layer's own tensors, and the op uses the copy packed
from exactly those tensors, unchanged, while a `with` holds it (otherwise it computes the plain product).
SmolLM2-135M in bf16, 8 rows, 48 new tokens, 2 threads, eager and compiled calls alternating in one
process: eager 224-230 tokens/s, compiled 259-265 (the previous compiled steps, which ran the plain bf16
layers that oneDNN re-packs at every call: 215-226), after a compile of 38-74 s per shape variant.

Only base layers are packed: adapter factors (`lora_A`, `lora_B`, ...) stay as they are, and
so do quantized layers, which bring their own kernels. The packed copy is bf16 and is
extra memory while it lives (half the float weights' size if they are fp32, as large if bf16),
so nothing new is packed when that copy would take more than a quarter of the memory the system
reports available (/proc/meminfo): a model chosen to fit a memory budget keeps fitting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from restora.kernels.derived import Derived, fingerprint
from restora.core.runtime import available_memory

__all__ = ["PackedLinear", "can_pack", "forget_packed", "packed_linears"]


def can_pack(device: torch.device) -> bool:
    """oneDNN bf16 packing is available: a CPU with bf16 support in this torch build."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


class _Pack:
    """One layer's weight packed once into oneDNN's blocked bf16 layout, and its bias in bf16."""

    __slots__ = ("packed", "bias")

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(torch.bfloat16), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


# Inside a torch.compile'd graph the packed copy cannot be an input (oneDNN's opaque layout has no fake
# tensor), so compiled code calls this op with the layer's own weight and bias, and the op finds the copy
# packed from exactly those tensors, unchanged (their fingerprint), among the layers packed right now.
torch.library.define("restora::packed_linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIVE: dict[tuple, list] = {}  # fingerprint of (weight, bias) -> [pack, how many `with`s hold it]
_LIVE_LOCK = threading.Lock()  # a server thread and a caller may hold `with`s over the same layers


def _hold(layers: list[PackedLinear], by: int) -> None:
    """What restora::packed_linear finds while a `with` lasts (nested withs over a layer share its entry)."""
    with _LIVE_LOCK:
        for layer in layers:
            entry = _LIVE.setdefault(layer.key, [layer.pack, 0])
            entry[1] += by
            if not entry[1]:
                del _LIVE[layer.key]


@torch.library.impl("restora::packed_linear", "CPU")
def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    live = _LIVE.get(fingerprint((weight, bias)))
    if live is None:  # not packed at the moment, or changed since: the same product, unpacked
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return live[0](x)


@torch.library.register_fake("restora::packed_linear")
def _packed_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class PackedLinear(nn.Module):
    """y = x @ W^T + b in bf16 with W packed once into oneDNN's layout (inference only).

    It holds the layer's own weight and bias (not copies): eager calls use the packed copy directly,
    compiled graphs reach it through `restora::packed_linear`, keyed on those tensors."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.pack = _Pack(linear, batch_hint)
        self.key = fingerprint((linear.weight, linear.bias))  # what restora::packed_linear finds the copy by

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if torch.compiler.is_compiling():
            return torch.ops.restora.packed_linear(x, self.weight, self.bias)
        return self.pack(x)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, bf16 packed"


_PACKED: Derived[PackedLinear] = Derived()  # each layer's packed copy, kept while its weight and bias are unchanged


def forget_packed(model: nn.Module) -> int:
    """Drop the kept packed copies of `model`'s layers (frees their memory); returns how many."""
    return _PACKED.forget(model.modules())


def _adapter_part(name: str) -> bool:
    return any(part.startswith(("lora_", "ia3_")) for part in name.split("."))


@contextmanager
def packed_linears(model: nn.Module, batch_hint: int = 1, enabled: bool = True,
                   skip: nn.Module | None = None) -> Iterator[int]:
    """Swap every float base nn.Linear for a PackedLinear during the `with`; yields how many were swapped.

    Linears inside `skip` stay as they are (e.g. the decoder blocks of a server that budgets no second copy
    of a float base's weights)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    packed: dict[int, PackedLinear] = {}
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
        free = available_memory()
        if fresh and free is not None and 2 * sum(c.weight.numel() for c in fresh) > free // 4:
            # a new bf16 copy would crowd the memory the model was sized for: those layers decode unpacked
            swapped = [(parent, name, child) for parent, name, child in swapped if id(child) in packed]
        else:
            packed.update({id(c): _PACKED.get(c, (c.weight, c.bias), lambda c=c: PackedLinear(c, batch_hint))
                           for c in fresh})
        for parent, child_name, child in swapped:
            setattr(parent, child_name, packed[id(child)])
    live = [packed[key] for key in {id(child) for _, _, child in swapped}]
    _hold(live, 1)
    try:
        yield len(swapped)
    finally:
        _hold(live, -1)
        for parent, child_name, child in swapped:
            setattr(parent, child_name, child)
