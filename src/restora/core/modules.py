"""Walking a Hugging Face causal LM's structure: its decoder blocks, and replacing a submodule by name."""

from __future__ import annotations

from torch import nn

__all__ = ["decoder_blocks", "set_module"]


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
