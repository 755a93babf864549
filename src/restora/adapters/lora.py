"""LoRA: a low-rank update added beside any frozen base layer (Hu et al. 2021, arXiv:2106.09685).

    h = W0 x + s · B A x,    A: (r, in), B: (out, r),    s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform (a = sqrt(5), as loralib and PEFT) or Gaussian (std 1/r, as PEFT),
and B starts at zero, so the adapted model starts equal to the base (Hu et al. 2021).

`LoRALinear` wraps its base as `self.base_layer` and only ever calls it: the base may be
a float `nn.Linear`, a GPT-2 `Conv1D` or a quantized layer of any format, and the adapter
never looks inside. Shapes come from `linear_shape`. Post LoRA
Restoration is `swap_base`: one assignment, and the adapter does not notice.

Merging changes weights, so it happens only when the caller asks (`merge` / `unmerge`):
onto a float base it is an exact in-place add; a base that cannot change in place (a
quantized one) offers `with_weight`, which builds a new base of its own format holding
W0 + s·BA: the format decides how (requantizing rounds, and warns). The original base is
kept while merged, so `unmerge` restores it bit for bit.

Also here: the `AdapterModule` protocol every restora adapter (LoRA, (IA)³) satisfies,
`replace_weight` (the single place that writes a dense weight into any base layer), and
the `disable_adapters` context manager.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from restora.quant.linear import linear_shape, weight_of

__all__ = [
    "swap_base_of",
    "LoRAConfig", "LoRALinear", "AdapterModule", "adapter_modules", "disable_adapters", "replace_weight",
]

_INITS = ("default", "gaussian")


@dataclass
class LoRAConfig:
    """LoRA settings.

    r: rank of the update (> 0).
    alpha: numerator of the scaling (> 0).
    dropout: dropout on the adapter's input, in [0, 1).
    use_rslora: scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
    init: "default" (A Kaiming-uniform a=sqrt(5), B = 0) or "gaussian" (A ~ N(0, 1/r²), B = 0).
    target_modules: "all" (every linear layer of the decoder blocks, MLP included: the default
        LoRA Without Regret argues for), "attn" (q, k, v, o projections), a list of module names
        (a name matches a module whose path equals it or ends with "." + it), or a regex that
        must match a whole module path (PEFT's rules).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    target_modules: str | list[str] = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise ValueError(f"LoRA init must be one of {', '.join(_INITS)}, got {self.init!r}")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"LoRA target_modules must be non-empty names, got {self.target_modules!r}")
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"LoRA target_modules must be a preset, a regex or a list of names, got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@runtime_checkable
class AdapterModule(Protocol):
    """What every restora adapter offers; the rest of restora needs nothing else."""

    base_layer: nn.Module
    adapter_enabled: bool
    merged: bool

    def adapter_params(self) -> list[nn.Parameter]: ...

    def peft_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...

    def swap_base(self, new_base: nn.Module) -> nn.Module: ...


def swap_base_of(layer: nn.Module, new_base: nn.Module, what: str) -> nn.Module:
    """Put `new_base` under the adapter `layer` (PLR's restore step) once its shape is checked and the layer is
    not merged; returns the old base."""
    if getattr(layer, "merged", False):
        raise ValueError(f"cannot swap the base of a merged {what}: call unmerge() first")
    need = (layer.out_features, layer.in_features)
    if linear_shape(new_base) != need:
        raise ValueError(f"new base has shape {linear_shape(new_base)} (out, in), the {what} needs {need}")
    old, layer.base_layer = layer.base_layer, new_base
    return old


@torch.no_grad()
def replace_weight(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """Write the dense (out, in) `weight` (and `bias`, when given) into `base`; returns the layer now holding it.

    Float layers (nn.Linear, Conv1D) are updated in place. A layer that cannot be offers
    `with_weight`, which returns a new layer of its own format and leaves `base` as it was.
    """
    with_weight = getattr(base, "with_weight", None)
    if with_weight is not None:
        # Its warning names the line that called merge(), 5 frames up: this function, its no_grad
        # wrapper, merge, merge's wrapper, then the caller.
        return with_weight(weight, bias, stacklevel=5)
    if isinstance(base, nn.Linear):
        base.weight.copy_(weight.to(base.weight.dtype))
    elif type(base).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        base.weight.copy_(weight.T.to(base.weight.dtype))
    else:
        raise TypeError(f"cannot merge into a {type(base).__name__}: expected nn.Linear, Conv1D or a quantized layer")
    if bias is not None:
        base.bias.copy_(bias.to(base.bias.dtype))
    return base


class LoRALinear(nn.Module):
    """base_layer(x) + s · B(A(dropout(x))), with PEFT's parameter names lora_A.weight, lora_B.weight."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        out_features, in_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.r = config.r
        self.scaling = config.scaling
        w = next(iter([*base_layer.parameters(), *base_layer.buffers()]), None)  # a quantized base has buffers only
        device = w.device if w is not None else None
        self.lora_A = nn.Linear(in_features, config.r, bias=False, device=device)  # weight (r, in)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, device=device)  # weight (out, r)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        self.merged = False
        self._unmerged: list[nn.Module] = []  # the base merging replaced, kept exact (not a submodule)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.config.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.adapter_enabled or self.merged:
            return y
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))  # (..., in) -> (..., r) -> (..., out)
        return y + (update * self.scaling).to(y.dtype)

    # -- the adapter interface ------------------------------------------------------------
    def adapter_params(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight]

    def delta_weight(self) -> torch.Tensor:
        """s · B A, the (out, in) update this adapter adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight).detach() * self.scaling

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.lora_A.weight.copy_(tensors["lora_A.weight"])
        self.lora_B.weight.copy_(tensors["lora_B.weight"])

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s·BA. Merging twice equals merging once."""
        if self.merged:
            return
        new_base = replace_weight(self.base_layer, weight_of(self.base_layer) + self.delta_weight())
        if new_base is not self.base_layer:
            self._unmerged, self.base_layer = [self.base_layer], new_base
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: a quantized base comes back exactly; a float base by subtraction."""
        if not self.merged:
            return
        if self._unmerged:
            self.base_layer = self._unmerged.pop()
        else:
            replace_weight(self.base_layer, weight_of(self.base_layer) - self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def set_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Replace A (r', in) and B (out, r') by factors of any rank r', keeping the scaling s.

        The config's alpha is rescaled (alpha' = s·r', or s·sqrt(r') with rsLoRA) so that a
        saved folder still means s·B'A'. Used by restoration modes that add exact low-rank terms.
        """
        if self.merged:
            raise ValueError("cannot change the factors of a merged LoRA layer: call unmerge() first")
        rank = lora_A.shape[0]
        if lora_A.shape != (rank, self.in_features) or lora_B.shape != (self.out_features, rank):
            raise ValueError(
                f"LoRA factors must be A (r, {self.in_features}) and B ({self.out_features}, r), got"
                f" {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
            )
        old = self.lora_A.weight
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=old.device, dtype=old.dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=old.device, dtype=old.dtype)
        self.lora_A.weight.copy_(lora_A)
        self.lora_B.weight.copy_(lora_B)
        self.lora_A.weight.requires_grad_(old.requires_grad)
        self.lora_B.weight.requires_grad_(old.requires_grad)
        alpha = self.scaling * (math.sqrt(rank) if self.config.use_rslora else rank)
        self.config = replace(self.config, r=rank, alpha=alpha)
        self.r = rank

    def swap_base(self, new_base: nn.Module) -> nn.Module:
        """Put `new_base` under this adapter (PLR's restore step); returns the old base."""
        return swap_base_of(self, new_base, "LoRA layer")

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """(path, module) for every adapter in `model`, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes with its base layers only."""
    adapters = [m for _, m in adapter_modules(model)]
    merged = [n for n, m in adapter_modules(model) if m.merged]
    if merged:
        raise ValueError(f"cannot disable merged adapters (e.g. {merged[0]}): call unmerge() first")
    before = [m.adapter_enabled for m in adapters]
    for m in adapters:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(adapters, before):
            m.adapter_enabled = state
