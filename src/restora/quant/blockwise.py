"""Running a causal LM one decoder block at a time: capture what block 0 receives, then carry it block to block.

GPTQ (restora.quant.gptq) and streamed perplexity (restora.infer.perplexity) see the model one block at a time, so
only one block's float weights need be resident: each row's hidden states (1, T, hidden) go through block b, and
its outputs are block b+1's inputs. Block 0's inputs, with the other arguments the model passes its blocks
(position embeddings, masks), are captured by a pre-hook that stops the forward there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Rows", "StopForward", "capture_block_inputs", "run_block"]

Rows = list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]]  # (hidden states, other args, kwargs) per row


class StopForward(Exception):
    """Raised by the pre-hook on block 0 once its inputs are captured."""


def capture_block_inputs(
    model: nn.Module, block0: nn.Module, calibration: list[torch.Tensor], device: torch.device
) -> Rows:
    """(hidden states, other args, kwargs) that block 0 receives for each row of token ids (1-D tensors)."""
    captured: Rows = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in calibration:
            try:
                model(input_ids=ids.view(1, -1).to(device), use_cache=False)  # (1, T)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out
