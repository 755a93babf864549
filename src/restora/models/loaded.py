"""LoadedModel: a causal LM with its tokenizer and where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["LoadedModel"]


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str  # what the user named: alias, hub id or path
    source_hash: str  # sha256 of the float source weights
    folder: Path | None  # the local folder it was loaded from, if any
    manifest: dict[str, Any] | None = None  # set for restora quantized checkpoints
