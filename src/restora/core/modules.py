"""Walking a Hugging Face causal LM's structure: its decoder blocks, and replacing a submodule by name."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["decoder_blocks", "set_module", "unique_state_dict"]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama/Qwen2/Mistral/Gemma/GPT-2 layouts)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "layers"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once, under their first name (embed_tokens before lm_head), detached;
    safetensors refuses shared storage and transformers ties the head again on load."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.numel())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out
