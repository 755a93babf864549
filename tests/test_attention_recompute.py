"""Recomputed training attention: bit-identical to eager, and no (T, T) map kept for the backward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import right_padded_batch, tiny_llama, with_trained_lora
from torch import nn

from restora.kernels.attention import RECOMPUTE, register, training_attention
from restora.train.loop import _set_attention, completion_loss

B, T = 3, 13


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return right_padded_batch(B, T, prompt=5, lengths={0: 9})


def _model(impl: str) -> nn.Module:
    model = with_trained_lora(tiny_llama())
    _set_attention(model, impl)
    return model


def _step(impl: str, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[tuple[int, ...]]]:
    model = _model(impl)
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        s, _ = completion_loss(model, *_batch())
    s.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return s.detach(), grads, shapes


@pytest.mark.parametrize("bf16", [False, True])
def test_same_loss_and_gradients_as_eager(bf16):
    loss, grads, _ = _step(register(recompute=False), bf16)  # eager (padding-free, as RECOMPUTE is)
    loss_r, grads_r, _ = _step(register(), bf16)
    assert torch.equal(loss, loss_r)
    assert grads.keys() == grads_r.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 layers x 2 blocks
    for n, g in grads.items():
        assert torch.equal(g, grads_r[n]), n


def test_no_attention_map_saved_for_backward():
    maps = lambda shapes: [s for s in shapes if len(s) == 4 and s[-2:] == (T, T) and s[1] > 1]  # (B, heads, T, T)
    assert maps(_step("eager", True)[2])  # eager keeps them, so the check below can fail
    assert not maps(_step(register(), True)[2])


def test_no_grad_forward_matches_eager():
    ids, _, mask = _batch()
    with torch.no_grad():
        want = _model("eager")(input_ids=ids, attention_mask=mask).logits
        got = _model(register())(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(want, got)


def test_training_attention_names():
    assert training_attention(tiny_llama()) == RECOMPUTE

    class Plain(nn.Module):  # its module (this test file) has no eager_attention_forward
        pass

    assert training_attention(Plain()) == "eager"
