"""Task evaluation of a model (+ adapter) on a chosen base: generated-answer metrics and log loss.

Metrics come from the task (GSM8K answer match; SQL exact and execution match), each
with n and a 95% confidence interval. The completion log loss on the same rows is
reported too, since LoRA Without Regret (Thinking Machines, 2025) argues it is the cleaner signal.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from restora.data import encode_rows, get_task, summarize
from restora.infer.generate import greedy_generate
from restora.train.loss import row_losses

__all__ = ["evaluate_task"]


def evaluate_task(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    rows: list[dict[str, Any]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_len: int = 512,
    generate: bool = True,
    use_chat_template: bool = False,
    progress: bool = True,
    speculate: int = 0,
    compile: bool = False,
    generate_limit: int | None = None,
) -> dict[str, Any]:
    """Metrics (value, n, 95% CI) and mean completion log loss of `model` on task `rows`.

    Also each row's (summed loss, label count) as `row_losses` and, when generating, each row's scores as
    `row_scores`: what a paired comparison of two models on the same rows needs. `generate_limit` generates
    for the first that many rows only (the log loss still covers all of them)."""
    t = get_task(task)
    t0 = time.perf_counter()
    encoded = encode_rows(t, tokenizer, rows, max_len, use_chat_template)
    per_row = row_losses(model, encoded, tokenizer.pad_token_id, batch_size)
    loss = sum(s for s, _ in per_row) / max(sum(n for _, n in per_row), 1)
    out: dict[str, Any] = {"task": t.name, "n": len(rows), "log_loss": loss, "compiled_decoding": compile and generate,
                           "row_losses": per_row}
    if generate:
        rows = rows[:generate_limit] if generate_limit is not None else rows
        prompts = [t.prompt(r, tokenizer, use_chat_template) for r in rows]
        preds = greedy_generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=t.stop, batch_size=batch_size,
            add_special_tokens=not use_chat_template, progress=progress, speculate=speculate,
            compile=compile,
        )
        scores = [t.score(p, r) for p, r in zip(preds, rows)]
        out["metrics"] = {k: v.as_dict() for k, v in summarize(scores).items()}
        out["row_scores"] = [dict(sc) for sc in scores]
        out["examples"] = [{"prediction": p, "reference": t.completion(r)} for p, r in list(zip(preds, rows))[:5]]
    out["seconds"] = time.perf_counter() - t0
    return out
