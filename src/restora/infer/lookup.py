"""Prompt lookup drafts for speculative greedy decoding.

Completions of SQL Create Context and GSM8K copy long runs from their own prompt (table
and column names, the question's numbers) and from what they already wrote. Prompt
lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; Yang et al. 2023, "Inference
with Reference: Lossless Acceleration of Large Language Models") drafts the next tokens
without a draft model: find the latest earlier occurrence of the row's last n tokens and
propose the k tokens that followed it.

The model then verifies all drafts in one forward (restora.infer.generate, speculate=k): with
inputs [t, d1, ..., dk] it predicts p0, ..., pk; d1..da are kept while d_i == p_(i-1),
and p_a is the next token. Every kept token is the model's own greedy choice, so the
output is greedy decoding's, up to the rounding of a forward over k+1 tokens instead of
one. A step costs about as much as a one-token step while decoding is bound by reading
the weights, so each accepted draft token is nearly free.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["lookup_draft"]


def lookup_draft(tokens: Sequence[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram (n <= max_ngram)."""
    if k <= 0:
        return []
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), 0, -1):
        tail = list(tokens[L - n :])
        for start in range(L - n - 1, -1, -1):  # latest first; the match must end before the suffix itself
            if list(tokens[start : start + n]) == tail:
                return list(tokens[start + n : start + n + k])
    return []
