"""Copies derived from frozen tensors, made once and kept until those tensors change.

Decoding packs each float layer's weight for oneDNN (restora.kernels.packed), and the training loss
casts a float LM head to the compute dtype (restora.kernels.head_loss). Both are pure functions of
weights that do not change between calls, and both cost 56–80 ms for SmolLM2's head, so
they are made once and kept with the module they belong to:

    cache = Derived()
    copy = cache.get(module, (weight, bias), make, extra)    # made on first use, then reused
    cache.find(module, (weight, bias), extra)                # the kept copy, or None

An entry is reused while every source is the same tensor storage (address, shape, dtype)
at the same version (in-place writes -- optimizer steps, `copy_`, load_state_dict -- move
a tensor's version counter) and `extra` (e.g. the target dtype) is equal. The entry holds
its sources, so no other tensor can take their address while it lives; it goes with the
module (weak keys) or with `forget`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import nn

__all__ = ["Derived", "fingerprint"]

T = TypeVar("T")


def fingerprint(sources: Sequence[torch.Tensor | None]) -> tuple:
    """What identifies these tensors' current values: address, shape, dtype and version counter of each."""
    return tuple(None if t is None else (t.data_ptr(), tuple(t.shape), t.dtype, t._version) for t in sources)


class Derived(Generic[T]):
    """module -> (fingerprint of its sources, extra, the sources held, the derived copy)."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any, tuple, T]] = weakref.WeakKeyDictionary()

    def find(self, owner: nn.Module, sources: Sequence[torch.Tensor | None], extra: Any = None) -> T | None:
        """The kept copy if it was derived from exactly these, unchanged, tensors (and `extra`)."""
        entry = self._entries.get(owner)
        if entry is None or entry[1] != extra or entry[0] != fingerprint(sources):
            return None
        return entry[3]

    def get(self, owner: nn.Module, sources: Sequence[torch.Tensor | None], make: Callable[[], T],
            extra: Any = None) -> T:
        """The kept copy, or `make()` kept in its place."""
        hit = self.find(owner, sources, extra)
        if hit is not None:
            return hit
        value = make()
        held = tuple(None if t is None else t.detach() for t in sources)
        self._entries[owner] = (fingerprint(sources), extra, held, value)
        return value

    def forget(self, owners: Iterable[nn.Module]) -> int:
        """Drop the copies kept for these modules; returns how many there were."""
        dropped = [m for m in owners if m in self._entries]
        for m in dropped:
            del self._entries[m]
        return len(dropped)
