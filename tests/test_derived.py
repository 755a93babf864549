"""restora.kernels.derived: a copy made from frozen tensors is reused until they change, and goes with its module."""

from __future__ import annotations

import gc

import torch
from torch import nn

from restora.kernels.derived import Derived


def test_reused_until_a_source_changes():
    cache: Derived[torch.Tensor] = Derived()
    lin = nn.Linear(8, 4)
    made = []

    def make() -> torch.Tensor:
        made.append(1)
        return lin.weight.detach().to(torch.bfloat16)

    first = cache.get(lin, (lin.weight, lin.bias), make, torch.bfloat16)
    assert cache.get(lin, (lin.weight, lin.bias), make, torch.bfloat16) is first and len(made) == 1
    assert cache.find(lin, (lin.weight, lin.bias), torch.float16) is None  # other `extra`: not this copy
    with torch.no_grad():
        lin.bias.add_(1)  # any source changed in place
    assert cache.find(lin, (lin.weight, lin.bias), torch.bfloat16) is None
    second = cache.get(lin, (lin.weight, lin.bias), make, torch.bfloat16)
    assert second is not first and len(made) == 2
    lin.weight = nn.Parameter(torch.zeros(4, 8))  # a new tensor
    assert cache.find(lin, (lin.weight, lin.bias), torch.bfloat16) is None
    assert cache.find(lin, (lin.weight, None), torch.bfloat16) is None  # a source missing is a difference too


def test_entries_go_with_their_module_or_when_forgotten():
    cache: Derived[int] = Derived()
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    cache.get(a, (a.weight,), lambda: 1)
    cache.get(b, (b.weight,), lambda: 2)
    assert cache.forget([a, nn.Linear(2, 2)]) == 1 and cache.find(a, (a.weight,)) is None
    assert cache.find(b, (b.weight,)) == 2
    del b
    gc.collect()
    assert len(cache._entries) == 0  # weak keys: a collected module leaves nothing behind
