"""Held-out perplexity of a causal LM on a list of texts: exp(mean token negative log-likelihood).

Texts are scored one micro-batch at a time, right-padded, with padding masked out of
both attention and loss. Used by `restora quantize` to report source vs quantized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["perplexity", "mean_nll"]


@torch.no_grad()
def mean_nll(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Mean negative log-likelihood (nats/token) over all predicted tokens of `texts`."""
    if not texts:
        raise ValueError("perplexity needs at least one text")
    total, count = 0.0, 0
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(texts), batch_size), desc="perplexity", disable=not progress, leave=False):
        enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((target != -100).sum())
    tokenizer.padding_side = side
    return total / max(count, 1)


def perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> float:
    return math.exp(mean_nll(model, tokenizer, texts, **kwargs))
