"""Held-out perplexity of a causal LM on a list of texts: exp(mean token negative log-likelihood).

`mean_nll` scores texts one micro-batch at a time, right-padded, with padding masked out of both attention and
loss, on a model held whole. `StreamedNLL` scores rows on a model seen one decoder block at a time, as
`restora quantize` streams it (restora.models.bases.stream_quantize): each block runs once in float and once
quantized, so the source's and the quantized model's perplexity come from one pass over the weights, and only
one block's float weights are ever resident.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from restora.core.modules import decoder_blocks
from restora.quant.blockwise import Rows, capture_block_inputs, run_block

__all__ = ["perplexity", "mean_nll", "StreamedNLL"]


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


class StreamedNLL:
    """Mean NLL (nats/token) of token-id rows under a model's float blocks and under its quantized blocks.

    Create it once the embeddings are loaded; call `float_block(b, block)` with block b in float and
    `quantized_block(b, block)` once it is quantized, in block order; then `result()`. Forward passes run
    under bf16 autocast; each row runs alone (1, T), so there is no padding.
    """

    def __init__(self, model: nn.Module, rows: list[torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> None:
        if not rows:
            raise ValueError("perplexity needs at least one row")
        decoder = model.get_decoder()
        self.norm = getattr(decoder, "norm", None)
        if self.norm is None:
            raise ValueError(f"streamed perplexity needs a final norm at model.get_decoder().norm, which "
                             f"{type(model).__name__} lacks: pass --eval-samples 0")
        self.model, self.ids, self.dtype = model, rows, dtype
        self.device = model.get_input_embeddings().weight.device
        with torch.no_grad(), self._autocast():
            start = capture_block_inputs(model, decoder_blocks(model)[0], rows, self.device)
        self.float_rows: Rows = start
        self.quantized_rows: Rows = list(start)

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def _step(self, rows: Rows, block: nn.Module) -> Rows:
        with self._autocast():
            return [(run_block(block, h, args, kwargs), args, kwargs) for h, args, kwargs in rows]

    def float_block(self, b: int, block: nn.Module) -> None:
        self.float_rows = self._step(self.float_rows, block)

    def quantized_block(self, b: int, block: nn.Module) -> None:
        self.quantized_rows = self._step(self.quantized_rows, block)

    @torch.no_grad()
    def _nll(self, rows: Rows) -> float:
        head = self.model.get_output_embeddings()
        total, count = 0.0, 0
        for (h, _, _), ids in zip(rows, self.ids):
            with self._autocast():
                logits = head(self.norm(h))[0, :-1].float()  # (T-1, V)
            target = ids.to(self.device)[1:]
            total += F.cross_entropy(logits, target, reduction="sum").item()
            count += target.numel()
        return total / max(count, 1)

    def result(self) -> tuple[float, float]:
        """(float NLL, quantized NLL), nats/token."""
        return self._nll(self.float_rows), self._nll(self.quantized_rows)
