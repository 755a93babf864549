"""Speculative greedy decoding with prompt-lookup drafts: the same tokens as plain greedy decoding, fewer forwards."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from restora.infer.decode import LeanDecoder
from restora.infer.generate import greedy_generate
from restora.infer.lookup import lookup_draft


def test_lookup_draft():
    assert lookup_draft([1, 2, 3, 9, 8, 1, 2, 3], 2) == [9, 8]  # the 3-gram 1 2 3 occurred before
    assert lookup_draft([5, 1, 2, 7, 1, 2, 4, 1, 2], 3) == [4, 1, 2]  # the latest occurrence wins
    assert lookup_draft([7, 6, 5, 4, 5], 4) == [4, 5]  # falls back to shorter n-grams; what follows may be short
    assert lookup_draft([1, 2, 3, 4], 3) == []  # nothing repeats
    assert lookup_draft([1, 1], 0) == [] and lookup_draft([], 3) == [] and lookup_draft([4], 3) == []


def _model_and_tok(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


PROMPTS = ["SELECT name FROM table WHERE name = name", "a b a b a b a", "Question: how many rows are in the table?",
           "x y z x y z x y"]


@pytest.mark.parametrize("k", [1, 4])
def test_speculative_equals_greedy(tiny_dir, k, monkeypatch):
    model, tok = _model_and_tok(tiny_dir)
    calls = []
    forward = LeanDecoder.forward

    def counting(self, ids, *args, **kwargs):
        calls.append(ids.shape[1])
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(LeanDecoder, "forward", counting)
    for stop in ((), ("a",)):  # rows finish at different steps, some inside a run of accepted drafts
        kw = dict(max_new_tokens=24, stop=stop, batch_size=3, bf16=False)
        calls.clear()
        want = greedy_generate(model, tok, PROMPTS, **kw)
        plain_calls = len(calls)
        calls.clear()
        got = greedy_generate(model, tok, PROMPTS, speculate=k, **kw)
        assert got == want
        if not stop:  # the random model repeats itself: drafts are accepted, so fewer forwards
            assert len(calls) < plain_calls and max(calls[2:]) > 1


def test_rejected_slots_are_invisible_and_compaction_keeps_logits():
    """Drafts rejected into holes (and holes compacted away) leave each row's logits as if never fed."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 256, (2, 5), generator=g)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded row
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    holes = LeanDecoder(model, 2, 5 + 9)  # too small for 4 steps of 3 fed tokens: forces compaction
    holes.forward(prompt, pos, mask)
    alone = []  # each row decoded alone, fed only what it keeps
    for b in range(2):
        dec = LeanDecoder(model, 1, 32)
        n = int(mask[b].sum())
        dec.forward(prompt[b : b + 1, -n:], pos[b : b + 1, -n:], mask[b : b + 1, -n:])
        alone.append(dec)
    last = pos[:, -1]
    compacted = False
    for kept in (torch.tensor([1, 2]), torch.tensor([3, 1]), torch.tensor([2, 2]), torch.tensor([1, 3])):
        fed = torch.randint(1, 256, (2, 3), generator=g)
        fpos = last[:, None] + 1 + torch.arange(3)  # (B, 3)
        length_before = holes.length
        got = holes.forward(fed, fpos, torch.ones_like(fed, dtype=torch.bool), all_logits=True)  # (B, 3, V)
        compacted |= holes.length < length_before + 3
        holes.reject(kept)
        for b in range(2):
            n = int(kept[b])
            want = alone[b].forward(fed[b : b + 1, :n], fpos[b : b + 1, :n], torch.ones((1, n), dtype=torch.bool),
                                    all_logits=True)  # (1, n, V)
            torch.testing.assert_close(got[b, :n], want[0], atol=1e-5, rtol=0)
        last = last + kept
    assert compacted


def test_speculate_needs_the_lean_forward(tiny_dir):
    model, tok = _model_and_tok(tiny_dir)
    kw = dict(max_new_tokens=8, batch_size=2, bf16=False)
    with pytest.warns(UserWarning, match="speculate=2 needs the lean forward"):
        got = greedy_generate(model, tok, PROMPTS[:2], lean=False, speculate=2, **kw)
    assert got == greedy_generate(model, tok, PROMPTS[:2], lean=False, **kw)
    with pytest.raises(ValueError, match="speculate must be between 0 and 15"):
        greedy_generate(model, tok, PROMPTS[:1], speculate=16, **kw)
