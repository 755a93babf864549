"""Write a float model as a plain Hugging Face folder, one tensor at a time.

`PreTrainedModel.save_pretrained` serialises each shard in memory before writing it; here the tensors stream to
disk through restora.core.safetensors_file, in shards of at most SHARD_BYTES with the index transformers reads.
Tied weights are stored once, under the name transformers keeps (the input embedding), as it does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restora.core.modules import unique_state_dict
from restora.core.safetensors_file import write_file
from restora.models.stream import INDEX, SINGLE

__all__ = ["save_hf", "SHARD_BYTES"]

SHARD_BYTES = 2 << 30


def save_hf(model: nn.Module, folder: str | Path, tokenizer: Any = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """config.json, generation_config.json, safetensors shard(s) (+ index) and the tokenizer, into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = unique_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        write_file(shards[0], folder / SINGLE, metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_file(shard, folder / name, metadata)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    if floats:  # config.json names the weights' dtype, as transformers writes it (e.g. "bfloat16")
        model.config.dtype = str(max(set(floats), key=floats.count)).removeprefix("torch.")
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
