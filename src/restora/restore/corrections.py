"""Output corrections for a restored base: keep the activation statistics the adapter adapted to.

An adapter trained on the k-bit base W_k co-adapts to that model's activations (docs/plr-smollm2.md's
measurements: removing the adapter's share of the weight error did nothing, matching mean
activations did). Both corrections here add a fixed bias b to each restored layer, so the
restored model's mean layer outputs equal the k-bit model's on a few training rows; a bias
is exact under merging and costs nothing at inference.

    first order   b = (W_k − W_l) · E[x_k]      x_k: the layer's input in the k-bit model + adapter
                  (`mean_inputs`; one forward of the k-bit model; exact only if the restored
                  model's inputs to the layer had the k-bit model's mean, which they drift from)
    mean match    b = E[W_k x_k] − E[W_l x_l]    x_l: the layer's input in the restored model with
                  the biases of every earlier layer already applied (`output_means` on the k-bit
                  model, then `mean_match_biases`: one batched forward of each model, the biases
                  set in network order by forward hooks, so each layer sees its predecessors
                  corrected)

Measured on SmolLM2 × SQL (docs/plr-smollm2.md), a 3-bit QLoRA adapter restored to 16 bits:
plain 0.599, first order 0.565, mean match 0.513 nats/token, against 0.551 on its own base.

`BiasedLinear` holds a base layer and its offset until `fold_biases` moves the offset into
the base's own bias (float or QuantLinear), which is what plain transformers loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from restora.quant.linear import QuantLinear
from restora.core.modules import set_module

__all__ = ["BiasedLinear", "fold_biases", "mean_inputs", "mean_match_biases", "output_means", "summed_inputs"]


class BiasedLinear(nn.Module):
    """base(x) + b: a base layer plus a fixed output offset."""

    def __init__(self, base: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = getattr(base, "in_features", None), getattr(base, "out_features", None)
        self.register_buffer("offset", bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.offset.to(y.dtype)


@torch.no_grad()
def fold_biases(model: nn.Module) -> None:
    """Replace each BiasedLinear by its base with the offset added to the base's own bias."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, BiasedLinear):
            continue
        base = m.base
        if isinstance(base, QuantLinear):
            old = base.bias if base.bias is not None else torch.zeros_like(m.offset)
            if "bias" in base._buffers:
                base._buffers["bias"] = old + m.offset
            else:  # QuantLinear without bias holds a plain `bias = None` attribute
                del base.bias
                base.register_buffer("bias", old + m.offset)
        elif isinstance(base, nn.Linear):
            if base.bias is None:
                base.bias = nn.Parameter(m.offset.clone().to(base.weight.dtype), requires_grad=False)
            else:
                base.bias.add_(m.offset.to(base.bias.dtype))
        else:
            continue
        set_module(model, name, base)


@torch.no_grad()
def summed_inputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], names: Sequence[str],
                  of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per named layer, Σ of(x) over the forwards of `batches` (model keyword arguments), x the layer's inputs
    (tokens, in) in float32, and the number of tokens seen: of = x.sum(0) gives E[x], of = xᵀx the Gram matrix."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in names}

    def hook(name: str):  # noqa: ANN202
        def fn(_m: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
            sums[name] = sums[name] + of(x) if name in sums else of(x)
            counts[name] += x.shape[0]
        return fn

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return sums, counts


def mean_inputs(model: nn.Module, tokenizer: Any, texts: Sequence[str], names: Sequence[str], max_len: int = 256) -> dict[str, torch.Tensor]:
    """E[x] per layer: the mean input vector over all tokens of `texts` (one row at a time)."""
    rows = ({"input_ids": tokenizer(t, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"]}
            for t in texts)
    sums, counts = summed_inputs(model, rows, names, lambda x: x.sum(0))
    return {n: sums[n] / max(counts[n], 1) for n in names if n in sums}


def _batch(tokenizer: Any, texts: Sequence[str], max_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    side = getattr(tokenizer, "padding_side", "right")
    try:
        tokenizer.padding_side = "right"
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def _hooked_forward(model: nn.Module, enc: dict[str, torch.Tensor], names: Sequence[str], make: Any) -> None:
    hooks = [model.get_submodule(n).register_forward_hook(make(n)) for n in names]
    was = model.training
    model.eval()
    try:
        model(**enc, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)


@torch.no_grad()
def output_means(model_k: nn.Module, tokenizer: Any, texts: Sequence[str], names: Sequence[str],
                 max_len: int = 256) -> dict[str, torch.Tensor]:
    """E[W_k x_k] per layer: its mean output over the real tokens of `texts` (one padded batch)."""
    enc = _batch(tokenizer, texts, max_len, next(model_k.parameters()).device)
    valid = enc["attention_mask"].bool()  # (B, T)
    means: dict[str, torch.Tensor] = {}

    def target(name: str):  # noqa: ANN202
        def fn(_m: nn.Module, _a: tuple, y: torch.Tensor) -> None:
            means[name] = y[valid].double().mean(0)  # (out,)
        return fn

    _hooked_forward(model_k, enc, names, target)
    return means


@torch.no_grad()
def mean_match_biases(model_l: nn.Module, targets: dict[str, torch.Tensor], tokenizer: Any, texts: Sequence[str],
                      names: Sequence[str], max_len: int = 256) -> dict[str, torch.Tensor]:
    """b per layer in `names` so that E[W_l x_l + b] = targets (= E[W_k x_k] from `output_means`), with
    x_l taken after the earlier layers' biases: forward hooks set them in network order, so each layer
    sees its predecessors corrected. The texts run as one padded batch (the same rows as the targets)."""
    enc = _batch(tokenizer, texts, max_len, next(model_l.parameters()).device)
    valid = enc["attention_mask"].bool()
    biases: dict[str, torch.Tensor] = {}

    def match(name: str):  # noqa: ANN202
        def fn(_m: nn.Module, _a: tuple, y: torch.Tensor) -> torch.Tensor:
            biases[name] = (targets[name] - y[valid].double().mean(0)).to(y.dtype)  # (out,)
            return y + biases[name]
        return fn

    _hooked_forward(model_l, enc, names, match)
    return {n: b.float() for n, b in biases.items()}
