"""Tasks: what a row looks like, how it becomes a prompt and a completion, and how it is scored.

The PLR protocol (the PLR report) fine-tunes on GSM8K and SQL Create Context with a
completion-only loss. A `Task` bundles, per data set:

    fields         the string fields every row must have
    templates      plain text: prompt = template.format(**row), completion likewise; the
                   prompt ends without a space and the completion starts with one, so BPE
                   tokenizers see " SELECT" / " Natalia" exactly as in running text
    chat           the user message and completion used with the tokenizer's chat template
    stop           strings that end a generation (after EOS, which always ends one)
    metric         score(prediction, row) -> {metric name: 1.0 | 0.0 | None (not scorable)}
    sources        local files under the data dir, and the hub id used without one

Tasks: `gsm8k`, `sql` (SQL Create Context) and `PATH.jsonl` (fields prompt, completion;
prompt and completion are concatenated verbatim; metric: exact match after stripping).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from restora.data.metrics import gsm8k_correct, text_exact_match
from restora.data.sources import load_hub, read_jsonl, resolve_data_dir
from restora.data.sql import sql_execution_match, sql_exact_match

__all__ = ["Task", "TASKS", "get_task", "jsonl_task", "known_tasks"]

Row = dict[str, Any]
Scores = dict[str, float | None]


def _as_float(x: bool | None) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True)
class Task:
    """One fine-tuning / evaluation task. See the module docstring for the fields."""

    name: str
    fields: tuple[str, ...]
    prompt_template: str  # plain-text prompt, str.format over the row
    completion_template: str  # text after the prompt; EOS is appended when encoding
    chat_template: str  # user message when use_chat_template=True
    chat_completion_template: str  # assistant reply when use_chat_template=True
    stop: tuple[str, ...]
    metric: Callable[[str, Row], Scores]
    files: Mapping[str, str] = field(default_factory=dict)  # part -> path (relative to data dir, or absolute)
    hub: tuple[str, str | None] | None = None  # (dataset id, config); parts are hub split names

    def __post_init__(self) -> None:
        if not self.fields:
            raise ValueError(f"task {self.name!r}: fields must not be empty")
        if "train" not in self.files:
            raise ValueError(f"task {self.name!r}: files must name a 'train' part, got {list(self.files)}")

    @property
    def parts(self) -> tuple[str, ...]:
        """Source parts this task ships: ('train',) or ('train', 'test')."""
        return tuple(self.files)

    def load(self, part: str = "train", data_dir: str | os.PathLike[str] | None = None) -> list[Row]:
        """All rows of one source part, from the data dir if set, else from the hub."""
        if part not in self.files:
            raise ValueError(f"task {self.name!r} has no part {part!r}; it has {list(self.files)}")
        path = Path(self.files[part])
        if not path.is_absolute():
            root = resolve_data_dir(data_dir)
            if root is None:
                if self.hub is None:
                    raise RuntimeError(f"task {self.name!r}: no data dir given and no hub source")
                return load_hub(self.hub[0], self.hub[1], part, self.fields)
            path = root / path
        return read_jsonl(path, self.fields)

    def prompt(self, row: Row, tokenizer: Any = None, use_chat_template: bool = False) -> str:
        """The prompt text: the plain template, or the tokenizer's chat template around the user message."""
        if not use_chat_template:
            return self.prompt_template.format(**row)
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"task {self.name!r}: use_chat_template=True needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": self.chat_template.format(**row)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def completion(self, row: Row, use_chat_template: bool = False) -> str:
        """The target text that follows the prompt (without EOS)."""
        template = self.chat_completion_template if use_chat_template else self.completion_template
        return template.format(**row)

    def text(self, row: Row) -> str:
        """Prompt + completion as one plain text (e.g. for quantization calibration)."""
        return self.prompt(row) + self.completion(row)

    def score(self, prediction: str, row: Row) -> Scores:
        """Metric values for one generated completion; None means the row cannot be scored."""
        return self.metric(prediction, row)


def _score_gsm8k(prediction: str, row: Row) -> Scores:
    return {"accuracy": _as_float(gsm8k_correct(prediction, row["answer"]))}


def _score_sql(prediction: str, row: Row) -> Scores:
    return {
        "exact_match": float(sql_exact_match(prediction, row["answer"])),
        "execution_match": _as_float(sql_execution_match(prediction, row["answer"], row["context"])),
    }


def _score_jsonl(prediction: str, row: Row) -> Scores:
    return {"exact_match": float(text_exact_match(prediction, row["completion"]))}


GSM8K = Task(
    name="gsm8k",
    fields=("question", "answer"),
    prompt_template="Question: {question}\nAnswer:",
    completion_template=" {answer}",
    chat_template="{question}",
    chat_completion_template="{answer}",
    stop=("\nQuestion:",),
    metric=_score_gsm8k,
    files={"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    hub=("openai/gsm8k", "main"),
)

SQL = Task(
    name="sql",
    fields=("question", "context", "answer"),
    prompt_template="Schema: {context}\nQuestion: {question}\nSQL:",
    completion_template=" {answer}",
    chat_template="Write one SQLite query that answers the question.\nSchema: {context}\nQuestion: {question}",
    chat_completion_template="{answer}",
    stop=("\n",),
    metric=_score_sql,
    files={"train": "sql_create_context/train.jsonl"},
    hub=("b-mc2/sql-create-context", None),
)

TASKS: dict[str, Task] = {t.name: t for t in (GSM8K, SQL)}


def jsonl_task(path: str | os.PathLike[str]) -> Task:
    """A generic task over one jsonl file with `prompt` and `completion` string fields."""
    path = Path(path).expanduser().resolve()
    return Task(
        name=str(path),
        fields=("prompt", "completion"),
        prompt_template="{prompt}",
        completion_template="{completion}",
        chat_template="{prompt}",
        chat_completion_template="{completion}",
        stop=(),
        metric=_score_jsonl,
        files={"train": str(path)},
    )


def known_tasks() -> str:
    return ", ".join(TASKS) + ", or PATH.jsonl (fields prompt, completion)"


def get_task(task: str | os.PathLike[str] | Task) -> Task:
    """A Task from its name ('gsm8k', 'sql') or a path ending in .jsonl."""
    if isinstance(task, Task):
        return task
    name = str(task)
    if name in TASKS:
        return TASKS[name]
    if name.endswith(".jsonl"):
        return jsonl_task(name)
    raise ValueError(f"unknown task {name!r}; known tasks: {known_tasks()}")
