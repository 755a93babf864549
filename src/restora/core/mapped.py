"""Weights memory-mapped from a safetensors file: convert them without keeping the file resident.

A model loaded with `mapped=True` (restora.models.stream; offloading, restora.models.offload) holds its
weights as views of the safetensors file, mapped copy-on-write: loading costs no memory, and a page enters
the process's resident set (RSS) when it is first read. Converting the model reads every page: `.to(bfloat16)` or
quantizing the linear layers keeps all of the source file resident next to the new
copy until the last view of the file dies. For SmolLM2-135M (a 538 MB fp32 file) that
was a 1.11 GiB peak for the bf16 cast, and 0.49 GiB of fp32 pages kept for good by a
quantized base, whose embedding still views the same file.

Here every converted tensor's pages are dropped as soon as the tensor is converted
(madvise MADV_DONTNEED on the whole pages inside it). That is safe exactly when the
mapping holds no private (written) page: a dropped clean page of a file mapping reads
back the same bytes from the file if anything touches it again. `release` checks that
in /proc/self/smaps and otherwise does nothing; so does every platform but Linux.
Values never change: conversion is the same `Tensor.to` as before.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["clean_file_mappings", "release", "releaser", "to_dtype"]

MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def clean_file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed mappings that hold no private (written) page."""
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 6)
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
                start, end = (int(x, 16) for x in head[0].split("-"))
                path = head[5].strip() if len(head) > 5 else ""
                current = (start, end) if path.startswith("/") and head[4] != "0" else None
            elif current is not None and head[0] == "Anonymous:":
                if int(head[1]) == 0:
                    out.append(current)
                current = None
    return out


def _extent(t: torch.Tensor) -> int:
    """Bytes from the tensor's first element to just past its last one (views included)."""
    return (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))) * t.element_size()


def releaser() -> Callable[[Iterable[torch.Tensor]], int]:
    """`release` with one snapshot of the mappings (read /proc/self/smaps once for many tensors)."""
    if not sys.platform.startswith("linux"):
        return lambda tensors: 0
    try:
        mappings = clean_file_mappings()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return lambda tensors: 0

    def drop(tensors: Iterable[torch.Tensor]) -> int:
        dropped = 0
        for t in tensors:
            if t.device.type != "cpu" or not t.numel():
                continue
            lo, hi = t.data_ptr(), t.data_ptr() + _extent(t)
            start, end = -(-lo // _PAGE) * _PAGE, hi // _PAGE * _PAGE  # whole pages inside only: neighbours keep theirs
            if end <= start or not any(a <= start and end <= b for a, b in mappings):
                continue
            if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
                dropped += end - start
        return dropped

    return drop


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of these tensors' bytes where they view a clean file mapping; returns bytes dropped."""
    return releaser()(tensors)


def converter(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """For `nn.Module._apply`: floating tensors to `dtype` (others as they are), each source's mapped pages
    dropped as it converts."""
    drop = releaser()

    def convert(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.dtype == dtype:
            return t
        out = t.to(dtype)
        drop([t])
        return out

    return convert


@torch.no_grad()
def to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)` (floating tensors only, the same conversion), dropping each source's mapped pages."""
    return model._apply(converter(dtype))
