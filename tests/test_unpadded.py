"""Padding-free training forward: same loss and gradients as the padded forward, on real tokens only."""

from __future__ import annotations

import pytest
import torch
from conftest import right_padded_batch, tiny_llama, with_trained_lora
from torch import nn

from restora.train import loss as restora_train
from restora.kernels.attention import register
from restora.train.loop import _set_attention, completion_loss, evaluate_loss
from restora.kernels.unpadded import BUCKET, pad_heads, unpad, unpad_heads
from restora.kernels.attention import can_unpad

B, T = 3, 13


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return right_padded_batch(B, T, prompt=4, lengths={0: 9, 2: 6})


def _family(name: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

    if name == "llama":
        return tiny_llama()
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    cfg = {"mistral": MistralConfig(sliding_window=None, **common), "qwen2": Qwen2Config(**common),
           "qwen3": Qwen3Config(head_dim=16, **common)}[name]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _loss_and_grads(model: nn.Module, unpadded: bool, bf16: bool, monkeypatch) -> tuple[torch.Tensor, int, dict]:
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(restora_train, "can_unpad", can_unpad if unpadded else (lambda m: False))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        s, n = completion_loss(model, *_batch())
    s.backward()
    return s.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("recompute", [True, False])
def test_unpadded_equals_padded_fp32(family, recompute, monkeypatch):
    model = with_trained_lora(_family(family))
    _set_attention(model, register(recompute))
    assert can_unpad(model)
    loss, n, grads = _loss_and_grads(model, False, False, monkeypatch)
    loss_u, n_u, grads_u = _loss_and_grads(model, True, False, monkeypatch)
    assert n == n_u == int((_batch()[1][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_u, loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_u.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 layers x 2 blocks
    for k, g in grads.items():
        torch.testing.assert_close(grads_u[k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_unpadded_bf16_within_rounding(monkeypatch):
    """Under bf16 autocast the row count of each matmul changes, so results move at rounding level only."""
    model = with_trained_lora(tiny_llama())
    _set_attention(model, register())
    loss, _, grads = _loss_and_grads(model, False, True, monkeypatch)
    loss_u, _, grads_u = _loss_and_grads(model, True, True, monkeypatch)
    assert abs(float(loss_u - loss)) < 0.02 * abs(float(loss))
    for k, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(grads_u[k].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, k


def test_padding_does_not_change_a_row(monkeypatch):
    """A row's loss is the same alone and inside a batch with longer rows (it sees no padding)."""
    model = with_trained_lora(tiny_llama())
    _set_attention(model, register())
    ids, labels, mask = _batch()
    with torch.no_grad():
        whole, _ = completion_loss(model, ids, labels, mask)
        parts = sum(completion_loss(model, ids[i : i + 1, : int(mask[i].sum())], labels[i : i + 1, : int(mask[i].sum())],
                                    mask[i : i + 1, : int(mask[i].sum())])[0] for i in range(B))
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-5)


def test_unpad_layout():
    ids, labels, mask = _batch()
    u = unpad(ids, labels, mask, torch.float32)
    n = int(mask.sum())
    assert u.rows.numel() == n and u.ids.shape == (1, u.targets.numel()) and u.ids.shape[1] % BUCKET == 0
    assert torch.equal(u.ids[0, :n], ids[mask.bool()]) and bool((u.targets[n:] == -100).all())
    assert u.positions[0, :n].tolist() == [t for b in range(B) for t in range(int(mask[b].sum()))]
    nxt = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], dim=1)
    assert torch.equal(u.targets[:n], nxt[mask.bool()])
    assert u.mask.shape == (B, 1, T, T)
    assert float(u.mask[0, 0, 3, 4]) == torch.finfo(torch.float32).min  # the future is hidden
    assert float(u.mask[0, 0, 10, 9]) == torch.finfo(torch.float32).min  # padding keys are hidden
    assert float(u.mask[0, 0, 5, 2]) == 0.0


def test_pad_heads_round_trip():
    ids, labels, mask = _batch()
    u = unpad(ids, labels, mask, torch.float32)
    x = torch.randn(1, 4, u.ids.shape[1], 8, requires_grad=True)  # (1, heads, N', D)
    padded = pad_heads(x, u.rows, B, T)  # (B, heads, T, D)
    assert padded.shape == (B, 4, T, 8) and float(padded.detach()[0, :, 9:].abs().sum()) == 0.0
    back = unpad_heads(padded.transpose(1, 2), u.rows, x.shape[2])  # (1, N', heads, D)
    n = u.rows.numel()
    back_ = back.detach()
    assert torch.equal(back_[0, :n], x.detach()[0, :, :n].transpose(0, 1)) and float(back_[0, n:].abs().sum()) == 0.0
    back.sum().backward()
    assert torch.equal(x.grad[0, :, :n], torch.ones(4, n, 8)) and float(x.grad[0, :, n:].abs().sum()) == 0.0


def test_who_runs_unpadded():
    model = tiny_llama()
    _set_attention(model, "eager")
    assert not can_unpad(model)  # transformers' own attention knows nothing of packed rows
    _set_attention(model, register())
    assert can_unpad(model)
    windowed = _family("mistral")
    windowed.config.sliding_window = 4
    _set_attention(windowed, register())
    assert not can_unpad(windowed)  # its mask is not the plain causal one

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    _set_attention(gpt2, register())
    assert not can_unpad(gpt2)


def test_evaluate_loss_unpadded_matches_padded(monkeypatch):
    model = with_trained_lora(tiny_llama())
    _set_attention(model, register())
    g = torch.Generator().manual_seed(5)
    rows = []
    for n in (5, 9, 14, 7, 11):
        x = torch.randint(1, 256, (n,), generator=g).tolist()
        rows.append({"input_ids": x, "labels": [-100] * 3 + x[3:]})
    got = evaluate_loss(model, rows, pad_id=0, micro_batch_size=2, bf16=False)
    monkeypatch.setattr(restora_train, "can_unpad", lambda m: False)
    want = evaluate_loss(model, rows, pad_id=0, micro_batch_size=2, bf16=False)
    assert abs(got - want) < 1e-5
