"""T-Few's choice scoring, length-normalised loss and unlikelihood loss against plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from restora.adapters import choice_scores, length_normalized_choice_loss, token_log_probs, unlikelihood_loss

B, C, T, V = 2, 3, 5, 11


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, T, V, generator=g) * 2
    targets = torch.randint(0, V, (B, C, T), generator=g)
    mask = torch.zeros(B, C, T)
    for b in range(B):
        for c in range(C):
            start = 1 + (b + c) % 2  # prompt tokens first, then a choice of 2..4 tokens
            mask[b, c, start : start + 2 + c] = 1
    correct = torch.tensor([2, 0])
    return logits, targets, mask, correct


def loop_log_prob(logits: torch.Tensor, targets: torch.Tensor, b: int, c: int, t: int) -> float:
    row = logits[b, c, t].double()
    return float(row[targets[b, c, t]] - torch.logsumexp(row, 0))


def test_choice_scores_are_length_normalised_log_probs() -> None:
    logits, targets, mask, _ = batch()
    scores = choice_scores(logits, targets, mask)
    assert scores.shape == (B, C)
    for b in range(B):
        for c in range(C):
            ts = [t for t in range(T) if mask[b, c, t]]
            want = sum(loop_log_prob(logits, targets, b, c, t) for t in ts) / len(ts)
            assert math.isclose(float(scores[b, c]), want, rel_tol=1e-5, abs_tol=1e-5)


def test_length_normalized_choice_loss_is_softmax_over_scores() -> None:
    logits, targets, mask, correct = batch()
    scores = choice_scores(logits, targets, mask).double()
    want = -sum(float(torch.log_softmax(scores[b], 0)[correct[b]]) for b in range(B)) / B
    got = length_normalized_choice_loss(logits, targets, mask, correct)
    assert math.isclose(float(got), want, rel_tol=1e-5)


def test_unlikelihood_loss_matches_loop_and_ignores_the_right_choice() -> None:
    logits, targets, mask, correct = batch()
    terms = [
        -math.log(1 - math.exp(loop_log_prob(logits, targets, b, c, t)))
        for b in range(B) for c in range(C) for t in range(T)
        if mask[b, c, t] and c != correct[b]
    ]
    got = unlikelihood_loss(logits, targets, mask, correct)
    assert math.isclose(float(got), sum(terms) / len(terms), rel_tol=1e-5)
    changed = logits.clone()
    changed[0, 2] = torch.randn(T, V)  # example 0's right choice
    assert torch.equal(unlikelihood_loss(changed, targets, mask, correct), got)


def test_losses_push_the_right_way() -> None:
    logits, targets, mask, correct = batch()
    logits.requires_grad_(True)
    before_scores = choice_scores(logits, targets, mask).detach()
    wrong_lp_before = token_log_probs(logits, targets).detach()
    (unlikelihood_loss(logits, targets, mask, correct) + length_normalized_choice_loss(logits, targets, mask, correct)).backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
        after = choice_scores(stepped, targets, mask)
        wrong_lp_after = token_log_probs(stepped, targets)
    for b in range(B):
        assert after[b, correct[b]] > before_scores[b, correct[b]]
        for c in range(C):
            if c != correct[b]:
                on = mask[b, c].bool()
                assert (wrong_lp_after[b, c][on] < wrong_lp_before[b, c][on]).all()


def test_bad_masks() -> None:
    logits, targets, mask, correct = batch()
    mask[1, 1] = 0
    with pytest.raises(ValueError, match="choice mask has a choice with no tokens"):
        choice_scores(logits, targets, mask)
    only_right = torch.zeros_like(mask)
    only_right[0, correct[0]] = 1
    only_right[1, correct[1]] = 1
    with pytest.raises(ValueError, match="needs at least one token of a wrong choice"):
        unlikelihood_loss(logits, targets, only_right, correct)
