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
inside compiled decoder blocks (restora.compiled), where the softmax was recomputed in the
backward already. Attention weights are not returned (training never asks for them).

    model.set_attn_implementation(training_attention(model))   # restora.train does this on CPU
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["RECOMPUTE", "recompute_attention", "register", "training_attention"]

RECOMPUTE = "restora_eager_recompute"  # the name under transformers' attention registries


def _family_eager(module: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The `eager_attention_forward` of the modeling file that defines `module`'s class."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__}: {type(module).__module__} has no eager_attention_forward to recompute")
    return fn


def _core(eager: Callable[..., tuple[torch.Tensor, Any]], module: nn.Module, query: torch.Tensor, key: torch.Tensor,
          value: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
    return eager(module, query, key, value, attention_mask, **kwargs)[0]  # (B, T, heads, head_dim)


def recompute_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, heads, T, head_dim)
    key: torch.Tensor,  # (B, kv_heads, S, head_dim)
    value: torch.Tensor,  # (B, kv_heads, S, head_dim)
    attention_mask: torch.Tensor | None,  # (B, 1, T, S) additive, as for eager
    **kwargs: Any,  # scaling, dropout, ... exactly as the model passes them to eager attention
) -> tuple[torch.Tensor, None]:
    """Eager attention of `module`'s model family; under autograd, its maps are recomputed in backward."""
    eager = _family_eager(module)
    if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return eager(module, query, key, value, attention_mask, **kwargs)[0], None
    out = checkpoint(_core, eager, module, query, key, value, attention_mask, kwargs, use_reentrant=False)
    return out, None


def register() -> str:
    """Make RECOMPUTE a valid attention implementation (eager's masks); returns the name. Idempotent."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(RECOMPUTE, recompute_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RECOMPUTE, eager_mask)
    return RECOMPUTE


def training_attention(model: nn.Module) -> str:
    """RECOMPUTE (registered) for model families with an `eager_attention_forward`, else plain "eager"."""
    if getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None) is None:
        return "eager"  # e.g. Falcon, Bloom: attention code of their own, no attention registry
    return register()
