"""Tokenized training examples with a completion-only loss mask.

QLoRA (Dettmers et al. 2023) and the PLR protocol train on the response only: the loss is
taken at completion positions and never at prompt positions. An example is

    input_ids = tok(prompt) + tok(completion) + [eos]
    labels    = [-100] * len(tok(prompt)) + tok(completion) + [eos]

Labels are aligned with input_ids (Hugging Face convention: the model shifts them). Prompt
and completion are tokenized separately, which is exactly what generation sees: the model
gets tok(prompt) and continues it.

Too long (len > max_len): the prompt is cut from the LEFT (its end, next to the answer,
matters most), keeping at least one prompt token. If the completion + EOS still does not fit
in max_len - 1, it is cut from the right and loses its EOS.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from restora.data.tasks import Task, get_task

__all__ = ["IGNORE_INDEX", "encode_example", "encode_rows"]

IGNORE_INDEX = -100  # label value ignored by cross-entropy


def encode_example(
    tokenizer: Any, prompt: str, completion: str, max_len: int, add_special_tokens: bool = True
) -> dict[str, list[int]]:
    """input_ids and labels (-100 on prompt positions) for one prompt/completion pair.

    `add_special_tokens` applies to the prompt only (e.g. a BOS token); pass False when the
    prompt came from a chat template that already holds them. EOS is always appended.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one prompt and one completion token), got {max_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; set tokenizer.eos_token before encoding")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    target = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [eos]
    if not prompt_ids:
        raise ValueError("prompt encodes to no tokens; the first completion token needs a prompt token before it")
    if len(prompt_ids) + len(target) > max_len:
        target = target[: max_len - 1]  # only shortens when completion+EOS alone overflows
        prompt_ids = prompt_ids[len(prompt_ids) - (max_len - len(target)):]  # keep the prompt's end
    return {"input_ids": prompt_ids + target, "labels": [IGNORE_INDEX] * len(prompt_ids) + target}


def encode_rows(
    task: str | Task,
    tokenizer: Any,
    rows: Iterable[dict[str, Any]],
    max_len: int,
    use_chat_template: bool = False,
) -> list[dict[str, list[int]]]:
    """encode_example over task rows (plain templates, or the tokenizer's chat template)."""
    task = get_task(task)
    out = [
        encode_example(
            tokenizer,
            task.prompt(row, tokenizer, use_chat_template),
            task.completion(row, use_chat_template),
            max_len,
            add_special_tokens=not use_chat_template,
        )
        for row in rows
    ]
    if not out:
        raise ValueError(f"task {task.name!r}: no rows to encode")
    return out
