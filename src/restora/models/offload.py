"""Offloading: the base's decoder blocks stay in their checkpoint file and are paged in one block at a time.

The PLR report leaves open whether offloading can create the spare memory a higher restore level l needs. Here a
model loaded with `mapped=True` (restora.models.stream, restora.models.quantized) holds its weights as views of a
private, copy-on-write mapping of the safetensors file: a page becomes resident when a forward pass first reads
it. `offload(model)` then hooks every decoder block:

    before block b runs:   madvise(WILLNEED) on block b+1's pages   (the kernel reads them ahead, asynchronously)
    after block b has run: madvise(DONTNEED) on block b's pages     (they leave the resident set; clean file pages
                                                                     read back from the page cache or the disk)

so about two blocks of weights are resident at a time, beside the embeddings, the head and the KV cache. What
it costs is re-reading each block every forward pass: from the page cache when the machine has room for it
(benchmarks/offload.py measures both sides), from the disk when it does not. Decoding then skips the copies
that would defeat it (packed bf16 weights, kernel layouts: `is_offloaded`).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from restora.core.mapped import clean_file_mappings, releaser
from restora.core.modules import decoder_blocks
from restora.quant.base import QuantizedWeight

__all__ = ["offload", "is_offloaded", "mapped_bytes"]

MADV_WILLNEED = 3
_PAGE = 4096
_OFFLOADED = "_restora_offloaded"  # set on the model by `offload`; decoding reads it through is_offloaded


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in [*module.parameters(), *module.buffers()] if t.device.type == "cpu" and t.numel()]


def _advise_willneed(libc: Any, tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        start = t.data_ptr() // _PAGE * _PAGE
        end = t.data_ptr() + t.numel() * t.element_size()
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_WILLNEED)


def offload(model: nn.Module, prefetch: bool = True) -> nn.Module:
    """Hook the decoder blocks of a file-mapped model so that their pages are resident only around their use."""
    blocks = decoder_blocks(model)
    if not sys.platform.startswith("linux"):
        raise ValueError("offloading pages weights with madvise, which needs Linux")
    if mapped_bytes(model) == 0:
        raise ValueError("offloading needs a model loaded with its weights mapped from the file (mapped=True)")
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    drop = releaser()  # the file mappings, read once: the model's own
    tensors = [_tensors(block) for block in blocks]

    def before(b: int) -> Any:
        def hook(_m: nn.Module, _args: Any) -> None:
            if prefetch and b + 1 < len(blocks):
                _advise_willneed(libc, tensors[b + 1])
        return hook

    def after(b: int) -> Any:
        def hook(_m: nn.Module, _args: Any, _out: Any) -> None:
            drop(tensors[b])
        return hook

    for q in model.modules():
        if isinstance(q, QuantizedWeight):
            q.keep_layouts = False  # a kernel layout is a resident copy of the codes: offloading goes without
    for b, block in enumerate(blocks):
        block.register_forward_pre_hook(before(b))
        block.register_forward_hook(after(b))
    drop(t for ts in tensors for t in ts)  # start with nothing paged in
    setattr(model, _OFFLOADED, True)
    return model


def is_offloaded(model: nn.Module) -> bool:
    return bool(getattr(model, _OFFLOADED, False))


def mapped_bytes(model: nn.Module) -> int:
    """Bytes of the decoder blocks' tensors that view a clean file mapping (what offloading can page out)."""
    if not sys.platform.startswith("linux"):
        return 0
    maps = clean_file_mappings()
    total = 0
    for t in (t for block in decoder_blocks(model) for t in _tensors(block)):
        p = t.data_ptr()
        if any(a <= p < b for a, b in maps):
            total += t.numel() * t.element_size()
    return total
