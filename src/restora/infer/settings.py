"""How a task split is scored: the settings `restora eval` and the grid's [eval] table share.

Each field's default and its doc live here once; `restora eval` makes one flag per field (restora.cli), and the
grid reads the same keys from its [eval] table (`settings_from`, restora.core.settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["EvalSettings"]


@dataclass(frozen=True)
class EvalSettings:
    """Which rows are scored, and how.

    Args:
        split: which split to score (test is never used in training).
        limit: score only the first N rows (0 = all).
        max_new_tokens: generation cap.
        batch_size: rows per forward pass.
        generate: also generate and score answers (else log loss only).
        materialize: dequantize each layer once to bf16 for fast evaluation (same numbers under bf16 compute).
        speculate: verify up to K prompt-lookup draft tokens per decoding step (greedy output; 0 = off).
        compile: run decoding steps as one torch.compile'd graph (SmolLM2, bf16, 2 threads: ~1.15x the tokens/s
            at batch 8 and ~1.1x at batch 1, after a one-time compile of 40-75 s per shape: batch 1 or more,
            1 or more tokens per step); worth it on long evaluations. bf16 results can differ from eager
            decoding by rounding.
    """

    split: Literal["train", "validation", "test"] = "test"
    limit: int = 0
    max_new_tokens: int = 128
    batch_size: int = 8
    generate: bool = True
    materialize: bool = True
    speculate: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation", "test"):
            raise ValueError(f"split must be train, validation or test, got {self.split!r}")
        if self.limit < 0:
            raise ValueError(f"limit must be 0 (all rows) or more, got {self.limit}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.speculate < 0:
            raise ValueError(f"speculate must be 0 (off) or more, got {self.speculate}")
