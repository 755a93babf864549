"""Deterministic train / validation / test splits; the test split never feeds training.

The PLR protocol keeps the epoch with the lowest validation loss and reports held-out test
metrics, so three disjoint splits are needed:

    test        GSM8K: test.jsonl. Single-file tasks (SQL, PATH.jsonl): the rows whose content
                hash falls below `test_fraction` (about 10%). It does NOT depend on the seed, so
                no choice of --seed can move a test row into training, and a row is in test
                whether it was read from the local 3,500-row file or from the full hub set.
    validation  a seeded choice of round(val_fraction * n) rows of what remains (exact count)
    train       the rest

Rows keep their file order within each split. `calibration_rows` (quantization calibration)
draws only from the train split.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any

from restora.data.tasks import Task, get_task

__all__ = ["Splits", "SPLITS", "split_rows", "task_split", "calibration_rows"]

Row = dict[str, Any]
SPLITS = ("train", "validation", "test")
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
_TEST_SALT = "restora-test-v1"


@dataclass(frozen=True)
class Splits:
    train: list[Row]
    validation: list[Row]
    test: list[Row]

    def __getitem__(self, name: str) -> list[Row]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return getattr(self, name)


def _row_key(task: Task, row: Row) -> str:
    return json.dumps({f: row[f] for f in task.fields}, sort_keys=True, ensure_ascii=False)


def _unit_hash(salt: str, key: str) -> float:
    """A deterministic number in [0, 1) from salt and key (sha256; no process-dependent hashing)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_rows(
    task: str | Task,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> Splits:
    """The three splits of a task (see the module docstring); `seed` moves only validation."""
    task = get_task(task)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    train_rows = task.load("train", data_dir)
    if "test" in task.parts:
        test, pool = task.load("test", data_dir), train_rows
    else:
        in_test = [_unit_hash(_TEST_SALT, _row_key(task, r)) < test_fraction for r in train_rows]
        test = [r for r, t in zip(train_rows, in_test) if t]
        pool = [r for r, t in zip(train_rows, in_test) if not t]
    n_val = round(val_fraction * len(pool))
    ranked = sorted(range(len(pool)), key=lambda i: _unit_hash(f"val:{seed}", f"{i}\0{_row_key(task, pool[i])}"))
    val_idx = set(ranked[:n_val])
    validation = [r for i, r in enumerate(pool) if i in val_idx]
    train = [r for i, r in enumerate(pool) if i not in val_idx]
    return Splits(train=train, validation=validation, test=test)


def task_split(
    task: str | Task,
    split: str,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[Row]:
    """One split, optionally its first `limit` rows; raises if the result is empty."""
    task = get_task(task)
    rows = split_rows(task, seed, data_dir)[split]
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"task {task.name!r}: split {split!r} is empty after filtering (limit={limit})")
    return rows


def calibration_rows(
    task: str | Task, n: int, seed: int = 0, data_dir: str | os.PathLike[str] | None = None
) -> list[Row]:
    """n rows drawn (seeded, without replacement) from the TRAIN split only; fewer if it is smaller."""
    if n <= 0:
        raise ValueError(f"calibration_rows: n must be positive, got {n}")
    train = task_split(task, "train", seed=seed, data_dir=data_dir)
    return random.Random(f"calibration:{seed}").sample(train, min(n, len(train)))
