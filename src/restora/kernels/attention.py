"""Training attention that keeps no (T x T) attention map for the backward pass.

restora trains on CPU with eager attention (its backward is faster there than SDPA's CPU
kernels at SFT lengths). Eager attention,

    P = softmax(Q K^T * scale + mask)        # (B, heads, T, T)
    O = P V                                  # (B, heads, T, head_dim)

saves its score and probability maps for the backward pass: two (B, heads, T, T) tensors
per layer, the largest activations of a short-sequence LoRA step (SmolLM2-135M, B = 8,
T = 217, compiled blocks: 388 MiB of 1.30 GiB saved activations).

`recompute_attention` runs the model family's own `eager_attention_forward` under
non-reentrant activation checkpointing (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost") around the attention core only: Q, K and V (which the backward
needs anyway, K and V before the grouped-query repeat) are kept, and the backward pass
recomputes Q K^T and the softmax, a small share of a step's work at these lengths (the
projections dominate). The same function runs on the same inputs, so outputs and
gradients are bit-identical to eager attention (tests/test_attention_recompute.py), also
inside compiled decoder blocks (restora.kernels.compiled), where the softmax was recomputed in the
backward already. Attention weights are not returned (training never asks for them).

    model.set_attn_implementation(training_attention(model))   # restora.train.loop does this on CPU

Both training implementations (RECOMPUTE, and EAGER for when whole blocks are recomputed
anyway) also take the padding-free forward of restora.kernels.unpadded: given `restora_rows` and
`restora_mask`, the packed (1, heads, N', D) query/key/value are scattered to the padded
layout, attended there, and the output gathered back to the packed tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from restora.kernels.unpadded import pad_heads, unpad_heads, unpaddable_family

__all__ = ["can_unpad", "EAGER", "RECOMPUTE", "TRAINING_IMPLS", "eager_attention", "recompute_attention", "register",
           "training_attention"]

RECOMPUTE = "restora_eager_recompute"  # the names under transformers' attention registries
EAGER = "restora_eager"
TRAINING_IMPLS = (RECOMPUTE, EAGER)


def _family_eager(module: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The `eager_attention_forward` of the modeling file that defines `module`'s class."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__}: {type(module).__module__} has no eager_attention_forward to recompute")
    return fn


def _core(eager: Callable[..., tuple[torch.Tensor, Any]], module: nn.Module, query: torch.Tensor, key: torch.Tensor,
          value: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
    return eager(module, query, key, value, attention_mask, **kwargs)[0]  # (B, T, heads, head_dim)


def _attend(recompute: bool, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
    eager = _family_eager(module)
    if not (recompute and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return eager(module, query, key, value, attention_mask, **kwargs)[0]
    return checkpoint(_core, eager, module, query, key, value, attention_mask, kwargs, use_reentrant=False)


def _training_attention(
    recompute: bool,
    module: nn.Module,
    query: torch.Tensor,  # (B, heads, T, head_dim), or (1, heads, N, head_dim) packed
    key: torch.Tensor,  # (B, kv_heads, S, head_dim)
    value: torch.Tensor,  # (B, kv_heads, S, head_dim)
    attention_mask: torch.Tensor | None,  # (B, 1, T, S) additive, as for eager
    **kwargs: Any,  # scaling, dropout, ... exactly as the model passes them to eager attention
) -> tuple[torch.Tensor, None]:
    rows, padded_mask = kwargs.pop("restora_rows", None), kwargs.pop("restora_mask", None)
    if rows is None:
        return _attend(recompute, module, query, key, value, attention_mask, kwargs), None
    B, T = padded_mask.shape[0], padded_mask.shape[-1]
    q, k, v = (pad_heads(x, rows, B, T) for x in (query, key, value))  # (B, heads, T, D) each
    out = _attend(recompute, module, q, k, v, padded_mask, kwargs)  # (B, T, heads, D)
    return unpad_heads(out, rows, query.shape[2]), None  # (1, N', heads, D)


def recompute_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Eager attention of `module`'s model family; under autograd, its maps are recomputed in backward."""
    return _training_attention(True, module, query, key, value, attention_mask, **kwargs)


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The model family's eager attention (maps kept for the backward), padding-free aware."""
    return _training_attention(False, module, query, key, value, attention_mask, **kwargs)


def register(recompute: bool = True) -> str:
    """Make RECOMPUTE (or EAGER) a valid attention implementation (eager's masks); returns the name. Idempotent."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name, fn = (RECOMPUTE, recompute_attention) if recompute else (EAGER, eager_attention)
    ALL_ATTENTION_FUNCTIONS.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    return name


def training_attention(model: nn.Module, recompute: bool = True) -> str:
    """RECOMPUTE, or EAGER without recompute (registered), for model families with an
    `eager_attention_forward`, else plain "eager"."""
    if getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None) is None:
        return "eager"  # e.g. Falcon, Bloom: attention code of their own, no attention registry
    return register(recompute)


def can_unpad(model: nn.Module) -> bool:
    """Whether `model`'s forward can run unpadded (a supported family, full attention, restora's attention)."""
    return unpaddable_family(model) and getattr(model.config, "_attn_implementation", None) in TRAINING_IMPLS
