"""Where task rows come from: local jsonl files, else the Hugging Face Hub.

Local files are read from a data directory laid out like ../shared/data:

    DATA_DIR/gsm8k/train.jsonl                 question, answer ("... #### N")
    DATA_DIR/gsm8k/test.jsonl
    DATA_DIR/sql_create_context/train.jsonl    question, context, answer

The directory is the `data_dir` argument, else $RESTORA_DATA_DIR. Without either, rows come
from the hub (`openai/gsm8k` config "main", `b-mc2/sql-create-context`) through the optional
`datasets` package, imported only then. Every bad-input error is one line that names the
file, the line number and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DATA_DIR_ENV", "resolve_data_dir", "read_jsonl", "load_hub"]

DATA_DIR_ENV = "RESTORA_DATA_DIR"
Row = dict[str, Any]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The data directory: the argument, else $RESTORA_DATA_DIR, else None (use the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        source = "data_dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        raise FileNotFoundError(f"{source}={str(chosen)!r} is not a directory")
    return path


def read_jsonl(path: str | os.PathLike[str], fields: tuple[str, ...]) -> list[Row]:
    """Rows of a jsonl file; each must be an object whose `fields` are strings.

    Blank lines are skipped. Extra fields are kept. Raises ValueError naming the file and
    the 1-based line number for malformed JSON, a non-object line, or a missing field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for field in fields:
                if field not in row:
                    raise ValueError(f"{path}:{lineno}: missing field {field!r} (expected fields {list(fields)})")
                if not isinstance(row[field], str):
                    raise ValueError(
                        f"{path}:{lineno}: field {field!r} must be a string, got {type(row[field]).__name__}"
                    )
            rows.append(row)
    return rows


def load_hub(dataset_id: str, config: str | None, split: str, fields: tuple[str, ...]) -> list[Row]:
    """Rows of one split of a hub dataset (needs `datasets` and the network, or its cache)."""
    hint = f"set {DATA_DIR_ENV} or pass --data-dir to read local jsonl files"
    try:
        import datasets  # optional dependency: imported only for hub loading
    except ImportError:
        raise RuntimeError(f"loading {dataset_id} from the hub needs the datasets package; {hint}") from None
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # network, cache and hub errors all mean the same thing to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"could not load {dataset_id} ({split}) from the hub: {first}; {hint}") from None
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise ValueError(f"hub dataset {dataset_id}: missing field(s) {missing} (columns {ds.column_names})")
    return [{f: str(row[f]) for f in fields} for row in ds]
